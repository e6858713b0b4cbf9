"""Offline throughput of the family runtime against vLLM's `LLM.generate`, same member, same prompts.

A family of hidden size 256 (8 layers, exits 1/3/5/7, head dim 64 as vLLM's CPU attention
needs) is saved and its member exit-3 (4 layers) exported as a stock Qwen3 checkpoint. Both
engines decode the same prompts (default 32 prompts of 8-64 random tokens, 64 new tokens each,
greedy, no early stop): one request at a time, then all at once. Our engine serves the member
from the family checkpoint, as `familial serve` does. vLLM runs in its own environment
(--vllm-python, else $FAMILIAL_VLLM_PYTHON, .venv-vllm or /work/vllm-venv) as a subprocess
with the same number of threads. Output tokens per second by wall time on both sides, the
ratio, and how many prompts got identical tokens. Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from familial.checkpoint_io import export_member, save_family
from familial.config import FamilyConfig
from familial.infer import Engine, SamplingParams
from familial.model import FamilyModel

ROOT = Path(__file__).resolve().parents[1]
MEMBER = 3

VLLM_SCRIPT = '''
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

if __name__ == "__main__":
    model, prompts_file, new_tokens, eager, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
    inputs = [TokensPrompt(prompt_token_ids=p) for p in json.load(open(prompts_file))]
    llm = LLM(model=model, dtype=dtype, max_model_len=512, gpu_memory_utilization=0.1, enforce_eager=eager,
              seed=0)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(inputs[:2], params, use_tqdm=False)
    print("READY", flush=True)
    # One run per line on stdin ("single" or "batched"), so the caller can alternate with its own.
    for line in sys.stdin:
        started = time.perf_counter()
        if line.strip() == "single":
            tokens = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in inputs]
        else:
            tokens = [o.outputs[0].token_ids for o in llm.generate(inputs, params, use_tqdm=False)]
        seconds = time.perf_counter() - started
        print("RESULT " + json.dumps({"seconds": seconds, "tokens": [list(t) for t in tokens]}), flush=True)
'''


def vllm_python(option: str | None) -> str | None:
    for candidate in (option, os.environ.get("FAMILIAL_VLLM_PYTHON"), ROOT / ".venv-vllm" / "bin" / "python",
                      Path("/work/vllm-venv/bin/python")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def write_member(work: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    """A family checkpoint and its member exit-3 exported as a dense Qwen3 checkpoint."""
    torch.manual_seed(0)
    config = FamilyConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                          num_attention_heads=4, num_key_value_heads=2, exits=[1, 3, 5, 7],
                          max_position_embeddings=1024, rope_theta=10000.0)
    model = FamilyModel(config)
    with torch.no_grad():
        # Peaked output distributions, as training makes them, so greedy choices are not near-ties.
        for name, parameter in model.named_parameters():
            if name.endswith("lm_head.weight"):
                parameter.mul_(30)
    family = save_family(model.to(dtype), work / "family")
    return family, export_member(family, work / "member", MEMBER)


class Ours:
    """The family runtime serving the member from the family checkpoint, as `familial serve` does."""

    def __init__(self, family: Path, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype) -> None:
        self.engine = Engine.from_checkpoint(family, dtype=dtype, max_batch_size=len(prompts), max_seq_len=512)
        self.engine.eos = set()
        self.prompts, self.params = prompts, SamplingParams(max_new_tokens=new_tokens, greedy=True)
        self.engine.generate(prompts[:2], MEMBER, self.params)

    def run(self, mode: str) -> tuple[float, list[list[int]]]:
        started = time.perf_counter()
        if mode == "single":
            tokens = [self.engine.generate([p], MEMBER, self.params)[0].token_ids for p in self.prompts]
        else:
            tokens = [r.token_ids for r in self.engine.generate(self.prompts, MEMBER, self.params)]
        return time.perf_counter() - started, tokens


class Theirs:
    """vLLM's offline engine in its own environment, driven one run at a time over a pipe."""

    def __init__(self, python: str, member: Path, prompts_file: Path, new_tokens: int, threads: int,
                 eager: bool, dtype: str) -> None:
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads),
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "VLLM_CPU_KVCACHE_SPACE": "1"}
        script = prompts_file.parent / "vllm_generate.py"
        script.write_text(VLLM_SCRIPT)
        self.log = (prompts_file.parent / "vllm.log").open("w")
        self.process = subprocess.Popen([python, str(script), str(member), str(prompts_file), str(new_tokens),
                                         "1" if eager else "0", dtype], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._wait("READY")

    def _wait(self, marker: str) -> str:
        for line in self.process.stdout:
            if line.startswith(marker):
                return line[len(marker):].strip()
        self.log.flush()
        tail = Path(self.log.name).read_text()[-3000:]
        raise SystemExit(f"vLLM stopped before answering:\n{tail}")

    def run(self, mode: str) -> tuple[float, list[list[int]]]:
        self.process.stdin.write(mode + "\n")
        self.process.stdin.flush()
        result = json.loads(self._wait("RESULT "))
        return result["seconds"], result["tokens"]

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts, 32 new tokens, vLLM without compilation")
    parser.add_argument("--prompts", type=int, help="number of prompts (default 32)")
    parser.add_argument("--tokens", type=int, help="new tokens per prompt (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on both sides (default 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile (quicker to start)")
    parser.add_argument("--vllm-python", help="python of an environment with vllm installed")
    parser.add_argument("--repeats", type=int, help="runs of each kind, alternating engines; best counts "
                                                    "(default 3, 2 with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    count = args.prompts or (8 if args.quick else 32)
    new_tokens = args.tokens or (32 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 3)
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="familial-vs-vllm-"))
    family, member = write_member(work, dtype)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 65, (count,), generator=generator).tolist()
    prompts = [torch.randint(0, 2048, (n,), generator=generator).tolist() for n in lengths]
    (work / "prompts.json").write_text(json.dumps(prompts))
    print(f"member exit-{MEMBER} of a hidden-256 family (4 layers), {count} prompts of 8-64 tokens, "
          f"{new_tokens} new tokens each, greedy, {args.dtype}, {args.threads} thread(s); output tokens/s by "
          f"wall time, best of {repeats} runs alternating between the engines", flush=True)
    engines = {"familial": Ours(family, prompts, new_tokens, dtype)}
    python = vllm_python(args.vllm_python)
    eager = args.eager or args.quick
    if python is not None:
        engines["vllm"] = Theirs(python, member, work / "prompts.json", new_tokens, args.threads, eager,
                                 args.dtype)
    figures = {"threads": args.threads, "dtype": args.dtype, "prompts": count, "new_tokens": new_tokens,
               "vllm": "compiled" if python and not eager else "eager" if python else
               "not installed (pass --vllm-python or set FAMILIAL_VLLM_PYTHON)"}
    try:
        for mode, label in (("single", "one request at a time"), ("batched", f"all {count} at once")):
            best, outputs = {}, {}
            for _ in range(repeats):
                for name, engine in engines.items():
                    seconds, outputs[name] = engine.run(mode)
                    best[name] = min(best.get(name, seconds), seconds)
            row = {f"{name}_tokens_per_s": round(count * new_tokens / s, 1) for name, s in best.items()}
            line = f"{label}: familial {row['familial_tokens_per_s']:.1f} tok/s"
            if "vllm" in engines:
                row["ratio"] = round(best["vllm"] / best["familial"], 2)
                row["identical"] = sum(a == b for a, b in zip(outputs["familial"], outputs["vllm"]))
                line += (f" vs vLLM {row['vllm_tokens_per_s']:.1f} tok/s = {row['ratio']:.2f}x "
                         f"(identical tokens on {row['identical']}/{count} prompts)")
            figures[mode] = row
            print(line, flush=True)
    finally:
        if "vllm" in engines:
            engines["vllm"].close()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
