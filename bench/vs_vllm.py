"""Offline throughput of the family runtime against vLLM's `LLM.generate`, same member, same prompts.

Random families of the widths --hidden (default 256, 512 and 1024; 8 layers, head dim 64 as
vLLM's CPU attention needs; --smollm2 adds SmolLM2-135M's shape, bench/shapes.py), or --family
DIR; the full member is exported as a stock Qwen3 checkpoint. Both engines decode the same
prompts (32 prompts of 8-64 random tokens, 64 new tokens each, greedy, no early stop): one
request at a time (concurrency 1), then the first 16 and all 32 at once. Our engine serves the
member from the family checkpoint, as `familial serve` does. vLLM runs in its own environment
(--vllm-python, else $FAMILIAL_VLLM_PYTHON, .venv-vllm or /work/vllm-venv) as a subprocess with
the same number of threads, with its defaults (torch.compile; --eager or --quick: eager). Each
shape runs once per count in --threads (default 1 and every core). Runs alternate between the
engines, each run with prompts of its own; the best and the worst of --repeats count. Output tokens per second by wall time on both
sides, the ratio, and how many prompts got identical tokens (time to first token: bench/serve.py).
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from familial.checkpoint_io import export_member
from familial.config import FamilyConfig
from familial.infer import Engine, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import add_arguments, random_family, shapes  # noqa: E402  (bench/shapes.py)

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 16, 32)

VLLM_SCRIPT = '''
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

if __name__ == "__main__":
    model, prompts_file, new_tokens, eager, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
    rounds = [[TokensPrompt(prompt_token_ids=p) for p in prompts] for prompts in json.load(open(prompts_file))]
    llm = LLM(model=model, dtype=dtype, max_model_len=512, gpu_memory_utilization=0.1, enforce_eager=eager,
              seed=0)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(rounds[0][:2], params, use_tqdm=False)
    print("READY", flush=True)
    # One run per line on stdin (a concurrency and a round), so the caller can alternate with its own.
    for line in sys.stdin:
        level, index = map(int, line.split())
        inputs = rounds[index]
        started = time.perf_counter()
        if level == 1:
            tokens = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in inputs]
        else:
            tokens = [o.outputs[0].token_ids for o in llm.generate(inputs[:level], params, use_tqdm=False)]
        seconds = time.perf_counter() - started
        print("RESULT " + json.dumps({"seconds": seconds, "tokens": [list(t) for t in tokens]}), flush=True)
'''


def vllm_python(option: str | None) -> str | None:
    for candidate in (option, os.environ.get("FAMILIAL_VLLM_PYTHON"), ROOT / ".venv-vllm" / "bin" / "python",
                      Path("/work/vllm-venv/bin/python")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


class Ours:
    """The family runtime serving the member from the family checkpoint, as `familial serve` does."""

    def __init__(self, family: Path, member: int, rounds: list[list[list[int]]], new_tokens: int,
                 dtype: torch.dtype) -> None:
        self.engine = Engine.from_checkpoint(family, dtype=dtype, max_batch_size=max(LEVELS), max_seq_len=512)
        self.engine.eos = set()
        self.member, self.rounds = member, rounds
        self.params = SamplingParams(max_new_tokens=new_tokens, greedy=True)
        self.engine.generate(rounds[0][:2], member, self.params)

    def run(self, level: int, index: int) -> tuple[float, list[list[int]]]:
        prompts = self.rounds[index]
        started = time.perf_counter()
        if level == 1:
            tokens = [self.engine.generate([p], self.member, self.params)[0].token_ids for p in prompts]
        else:
            tokens = [r.token_ids for r in self.engine.generate(prompts[:level], self.member, self.params)]
        return time.perf_counter() - started, tokens

    def close(self) -> None:
        self.engine.stop()


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
        started = time.perf_counter()
        self.process = subprocess.Popen([python, str(script), str(member), str(prompts_file), str(new_tokens),
                                         "1" if eager else "0", dtype], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._wait("READY")
        self.start_seconds = time.perf_counter() - started

    def _wait(self, marker: str) -> str:
        for line in self.process.stdout:
            if line.startswith(marker):
                return line[len(marker):].strip()
        self.log.flush()
        tail = Path(self.log.name).read_text()[-3000:]
        raise SystemExit(f"vLLM stopped before answering:\n{tail}")

    def run(self, level: int, index: int) -> tuple[float, list[list[int]]]:
        self.process.stdin.write(f"{level} {index}\n")
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
    parser.add_argument("--quick", action="store_true", help="width 256, one thread, 32 new tokens, vLLM eager")
    add_arguments(parser, hidden=[256, 512, 1024])
    parser.add_argument("--tokens", type=int, help="new tokens per prompt (default 64, 32 with --quick)")
    parser.add_argument("--threads", type=int, nargs="+",
                        help="intra-op threads on both sides, one run per count (default: 1 and every core)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile (quicker to start)")
    parser.add_argument("--vllm-python", help="python of an environment with vllm installed")
    parser.add_argument("--repeats", type=int, help="runs of each kind, alternating engines (default 3, 2 with --quick)")
    args = parser.parse_args()
    if args.quick and "--hidden" not in sys.argv:
        args.hidden = [256]
    threads = args.threads or ([1] if args.quick else sorted({1, os.cpu_count() or 1}))
    python = vllm_python(args.vllm_python)
    eager = args.eager or args.quick
    figures = {"dtype": args.dtype, "prompts": max(LEVELS), "new_tokens": args.tokens or (32 if args.quick else 64),
               "vllm": "compiled" if python and not eager else "eager" if python else
               "not installed (pass --vllm-python or set FAMILIAL_VLLM_PYTHON)", "runs": []}
    for shape in [None] if args.family else shapes(args):
        work = Path(tempfile.mkdtemp(prefix="familial-vs-vllm-"))
        try:
            family = Path(args.family) if args.family else random_family(work / "family", shape)
            label = str(family) if args.family else f"random ({shape.label})"
            for count in threads:
                figures["runs"].append(compare(args, family, label, count, python, eager, work / f"threads-{count}"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))
    return 0


def compare(args: argparse.Namespace, family: Path, label: str, threads: int, python: str | None, eager: bool,
            work: Path) -> dict:
    work.mkdir()
    torch.set_num_threads(threads)
    new_tokens = args.tokens or (32 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 3)
    dtype = getattr(torch, args.dtype)
    config = FamilyConfig.load(family)
    member = config.exits[-1]
    # Round 0 warms up; every run gets prompts of its own (vLLM's prefix cache, on by default,
    # would serve a prompt sent again without prefilling it).
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 65, (max(LEVELS),), generator=generator).tolist()
    rounds = [[torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
              for _ in range(repeats + 1)]
    prompts = rounds[1]
    (work / "prompts.json").write_text(json.dumps(rounds))
    print(f"{label}: member exit-{member} ({config.member_layers(member)} layers), {len(prompts)} prompts of "
          f"8-64 tokens, {new_tokens} new tokens each, greedy, {args.dtype}, {threads} thread(s); output tokens/s "
          f"by wall time, best and worst of {repeats} runs alternating between the engines", flush=True)
    engines = {"familial": Ours(family, member, rounds, new_tokens, dtype)}
    result = {"family": label, "threads": threads, "levels": {}}
    try:
        if python is not None:
            exported = export_member(family, work / "member", member)
            engines["vllm"] = Theirs(python, exported, work / "prompts.json", new_tokens, threads, eager, args.dtype)
            result["vllm_start_s"] = round(engines["vllm"].start_seconds, 1)
        for level in LEVELS:
            times, outputs = {}, {}
            for index in range(1, repeats + 1):
                for name, engine in engines.items():
                    seconds, outputs[name] = engine.run(level, index)
                    times.setdefault(name, []).append(seconds)
            tokens = len(prompts if level == 1 else prompts[:level]) * new_tokens
            row = {f"{name}_tokens_per_s": round(tokens / min(s), 1) for name, s in times.items()}
            line = f"  concurrency {level:2}: familial {row['familial_tokens_per_s']:.1f} tok/s"
            if "vllm" in engines:
                row["ratio"] = round(min(times["vllm"]) / min(times["familial"]), 2)
                row["ratio_worst"] = round(max(times["vllm"]) / max(times["familial"]), 2)
                row["identical"] = f"{sum(a == b for a, b in zip(outputs['familial'], outputs['vllm']))}/" \
                                   f"{len(outputs['familial'])}"
                line += (f" vs vLLM {row['vllm_tokens_per_s']:.1f} tok/s = {row['ratio']:.2f}x (worst runs "
                         f"{row['ratio_worst']:.2f}x; identical tokens on {row['identical']} prompts)")
            result["levels"][str(level)] = row
            print(line, flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    return result


if __name__ == "__main__":
    sys.exit(main())
