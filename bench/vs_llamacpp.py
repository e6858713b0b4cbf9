"""A member's greedy decoding in familial's engine against stock llama.cpp on the same weights.

The member is exported with `familial export --format gguf --type f32` and run by
llama-cpp-python (its own environment, .venv-llama, as scripts/test.sh builds it; or
--llama-python), both at batch 1 with the same thread count, on the same prompts (cut from
--data shards, or random ids), the same number of new tokens, greedy. Turns alternate between
the two (best of --repeats per prompt), llama.cpp in a child process that stays up, so a busy
spell hits both alike. Reports tokens/s of each (prefill of the prompt plus the new tokens, wall
time of the generation only), the ratio familial/llama.cpp, and how many prompts' greedy tokens
are identical (f32 on both sides; a float32 KV cache in llama.cpp); both stop at the member's
end-of-sequence token, and each side's speed counts the tokens it produced. Without --family it runs a
random family of SmolLM2's shape at 8 layers (--quick: hidden 256, 4 layers).
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from familial.cli import main as familial
from familial.infer import Engine, SamplingParams
from shapes import Shape, random_family

ROOT = Path(__file__).resolve().parents[1]

# Runs in llama.cpp's environment: one JSON job per line on stdin, one JSON answer per line out.
LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama

setup = json.loads(sys.stdin.readline())
llm = Llama(model_path=setup["model"], n_ctx=setup["n_ctx"], n_threads=setup["threads"],
            n_threads_batch=setup["threads"], n_batch=512, type_k=0, type_v=0, verbose=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    tokens = []
    started = time.perf_counter()
    for token in llm.generate(job["prompt"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in job["eos"]:
            break
        tokens.append(int(token))
        if len(tokens) == job["new_tokens"]:
            break
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - started}), flush=True)
"""


class LlamaCpp:
    """llama-cpp-python in a child process that keeps the model loaded between turns."""

    def __init__(self, python: str, model: Path, threads: int, n_ctx: int) -> None:
        self.process = subprocess.Popen([python, "-c", LLAMA_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env={"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"})
        self._send({"model": str(model), "threads": threads, "n_ctx": n_ctx})

    def _send(self, job: dict) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"llama.cpp's process ended (exit {self.process.wait()})")
        return json.loads(line)

    def generate(self, prompt: list[int], new_tokens: int, eos: list[int]) -> tuple[list[int], float]:
        answer = self._send({"prompt": prompt, "new_tokens": new_tokens, "eos": eos})
        return answer["tokens"], answer["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def prompts_from(data: str | None, count: int, length: int, vocab: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, spread evenly over the shards, or random ids."""
    if data is None:
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(count)]
    from familial.data.shards import TokenShards

    tokens = TokenShards(data).tokens
    starts = np.linspace(0, len(tokens) - length - 1, count).astype(int)
    return [np.asarray(tokens[s:s + length], dtype=np.int64).tolist() for s in starts]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random family, few prompts (CI)")
    parser.add_argument("--family", help="family checkpoint directory (default: a random family made here)")
    parser.add_argument("--member", default="-1", help="member to run (default: the full one)")
    parser.add_argument("--data", help="token shards to cut prompts from (default: random ids)")
    parser.add_argument("--prompts", type=int, help="prompts, each alone (batch 1)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=2, help="turns per prompt and contender (best counts)")
    parser.add_argument("--threads", type=int, default=1, help="threads of both (default 1)")
    parser.add_argument("--llama-python", default=str(ROOT / ".venv-llama" / "bin" / "python"),
                        help="a Python that imports llama_cpp")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new_tokens = args.tokens or (16 if args.quick else 64)
    count = args.prompts or (2 if args.quick else 6)
    if not Path(args.llama_python).exists():
        raise SystemExit(f"{args.llama_python}: no such interpreter (scripts/test.sh builds .venv-llama)")
    with tempfile.TemporaryDirectory() as scratch:
        family = Path(args.family) if args.family else random_family(
            Path(scratch) / "family", Shape(256, 4, 4, 2, 768, 2048) if args.quick else
            Shape(576, 8, 9, 3, 1536, 49152))
        gguf = Path(scratch) / "member.gguf"
        if familial(["export", str(family), str(gguf), "--member", args.member, "--format", "gguf",
                     "--type", "f32"]) != 0:
            raise SystemExit("export failed")
        engine = Engine.from_checkpoint(family, max_batch_size=1, max_seq_len=args.prompt_tokens + new_tokens + 8)
        member = int(args.member) if args.member.lstrip("-").isdigit() else args.member
        prompts = prompts_from(args.data, count, args.prompt_tokens, engine.model.config.vocab_size)
        llama = LlamaCpp(args.llama_python, gguf, args.threads, n_ctx=args.prompt_tokens + new_tokens + 8)
        params = SamplingParams(max_new_tokens=new_tokens, greedy=True)
        best = {"familial": [float("inf")] * count, "llama.cpp": [float("inf")] * count}
        produced = {"familial": 0, "llama.cpp": 0}
        same = 0
        try:
            for i, prompt in enumerate(prompts):
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    ours = engine.generate([prompt], member, params)[0].token_ids
                    best["familial"][i] = min(best["familial"][i], time.perf_counter() - started)
                    theirs, seconds = llama.generate(prompt, new_tokens, sorted(engine.eos))
                    best["llama.cpp"][i] = min(best["llama.cpp"][i], seconds)
                ours = [t for t in ours if t not in engine.eos]
                same += ours == theirs
                produced["familial"] += len(ours)
                produced["llama.cpp"] += len(theirs)
        finally:
            llama.close()
    speed = {name: produced[name] / sum(seconds) for name, seconds in best.items()}
    figures = {"family": str(args.family or "random"), "member": args.member, "threads": args.threads,
               "prompts": count, "prompt_tokens": args.prompt_tokens, "new_tokens": new_tokens,
               "familial_tokens_per_s": round(speed["familial"], 2),
               "llama_cpp_tokens_per_s": round(speed["llama.cpp"], 2),
               "ratio": round(speed["familial"] / speed["llama.cpp"], 3), "identical_outputs": same}
    print(f"familial {speed['familial']:.1f} tokens/s, llama.cpp {speed['llama.cpp']:.1f} tokens/s: "
          f"{figures['ratio']:.2f}x; greedy tokens identical on {same}/{count} prompts", file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
