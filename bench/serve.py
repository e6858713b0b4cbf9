"""Serving over HTTP: `familial serve` (the whole family) against vLLM serving the same member.

Both servers run in this one run, on loopback: `familial serve FAMILY` with every member
loaded from one copy of the weights, and stock vLLM's OpenAI server on that member exported by
`familial export`. Both are started first and each waits idle while the other is measured; the
levels alternate between them, for a few rounds. Tokens/s: each server's best round per level
counts (on a shared machine a busy spell then hits both alike instead of one server's whole
turn); the worst round is reported too. TTFT percentiles pool every round's requests per server
(the same prompts on both): the 95th percentile of one round's 64 requests is its 4th slowest,
which moves more from round to round than the servers differ.
The same requests go to both: streamed completions of prompts given as token ids of mixed lengths, greedy, a fixed
max_tokens that every request generates in full (the served family has no eos; vLLM gets
`ignore_eos`), at concurrency 1, 16 and 32. Per level: output tokens/s over the level's wall
time and p50/p95 time to first token (to the first text streamed); the ratios are familial /
vLLM (tokens/s: > 1 means familial is faster; TTFT: < 1 means familial answers sooner). Greedy
outputs are compared too.

Shapes: --family DIR (a trained family), else random families of the widths --hidden (default
256, 512 and 1024; 8 layers, head dim 64) and with --smollm2 SmolLM2-135M's shape (bench/shapes.py).
Threads: each shape runs once per count in --threads (default 1 and every core): `familial serve
--threads T`, and vLLM's worker OMP_NUM_THREADS=T with VLLM_CPU_OMP_THREADS_BIND=nobind (no
core pinning, as familial). vLLM runs with its defaults (torch.compile, minutes to warm up on
CPU; its start time is reported), or --enforce-eager with --vllm-eager or --quick. --quick: one
width (256), one thread, fewer requests and tokens (under a minute without vLLM's compile).
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from familial.cli import main as familial_cli
from familial.config import FamilyConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import add_arguments, random_family, shapes  # noqa: E402  (bench/shapes.py)

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 16, 32)


def without_eos(family: Path, directory: Path) -> Path:
    """The family with eos_token_id null (tensors linked, not copied): every request then runs
    to max_tokens, as vLLM's ignore_eos makes it do; familial's API has no such field."""
    directory.mkdir()
    for item in family.iterdir():
        if item.name != "family.json":
            (directory / item.name).symlink_to(item.resolve())
    config = json.loads((family / "family.json").read_text())
    config["eos_token_id"] = None
    (directory / "family.json").write_text(json.dumps(config, indent=2))
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process on loopback, waited for until /health answers."""

    def __init__(self, name: str, command: list[str], port: int, env: dict, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.start_seconds = time.perf_counter() - started

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stream(port: int, body: dict) -> dict:
    """One streamed completion: time to first token, tokens generated, text, token ids (vLLM)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    first = None
    text, ids, usage = [], [], None
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {response.read()[:300]!r}")
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            for choice in chunk.get("choices", []):
                # The first text a user sees, on both servers: each holds back a token whose text
                # is incomplete (part of a character), but vLLM still sends its id in a chunk.
                if first is None and choice.get("text"):
                    first = time.perf_counter() - started
                text.append(choice.get("text") or "")
                ids += choice.get("token_ids") or []
            usage = chunk.get("usage") or usage
    finally:
        connection.close()
    if first is None:
        # No text at all (tokens that never complete a character; vLLM then streams none): the
        # user waited for the whole answer.
        first = time.perf_counter() - started
    return {"ttft": first, "tokens": usage["completion_tokens"], "text": "".join(text), "ids": ids}


def run_level(port: int, bodies: list[dict], concurrency: int) -> tuple[dict, list[dict]]:
    results: list[dict | None] = [None] * len(bodies)
    errors: list[str] = []
    cursor = iter(range(len(bodies)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            try:
                results[index] = stream(port, bodies[index])
            except (OSError, RuntimeError) as error:
                errors.append(str(error))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"tokens_per_s": round(sum(r["tokens"] for r in results) / seconds, 1),
            **percentiles([r["ttft"] for r in results]), "requests": len(bodies), "seconds": round(seconds, 2)}, results


def percentiles(ttfts: list[float]) -> dict:
    ttfts = sorted(ttfts)
    return {"ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))], 4)}


def workload(vocab: int, requests: dict[int, int], max_tokens: int, lengths: list[int],
             seed: int) -> dict[int, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    bodies = {}
    for level, count in requests.items():
        bodies[level] = [{"prompt": torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=generator).tolist(),
                          "max_tokens": max_tokens, "temperature": 0, "stream": True,
                          "stream_options": {"include_usage": True}} for i in range(count)]
    return bodies


def measure(servers: list[tuple[Server, dict]], model: str, rounds: list[dict[int, list[dict]]],
            warm_up: dict) -> list[dict]:
    """Per server (with its extra request fields) and level: its best and worst round's figures,
    TTFT percentiles over every round's requests, the first round's outputs; its start-up time.
    Each round sends prompts of its own: a prompt sent again would be served from vLLM's prefix
    cache (on by default), which random prompts never hit in use."""
    results = [{"figures": {}, "worst": {}, "ttfts": {}, "outputs": {}, "start_s": round(server.start_seconds, 1)}
               for server, _ in servers]
    for server, extra in servers:
        stream(server.port, {**warm_up, "model": model, **extra})
    for bodies in rounds:
        for level in LEVELS:
            for (server, extra), result in zip(servers, results):
                figures, outputs = run_level(server.port, [{**b, "model": model, **extra} for b in bodies[level]],
                                             level)
                print(f"  {server.name:8} concurrency {level:2}: {figures['tokens_per_s']:7.1f} tokens/s, "
                      f"TTFT p50 {figures['ttft_p50_s']:.3f} s p95 {figures['ttft_p95_s']:.3f} s "
                      f"({figures['requests']} requests, {figures['seconds']} s)", flush=True)
                result["outputs"].setdefault(level, outputs)
                result["ttfts"].setdefault(level, []).extend(r["ttft"] for r in outputs)
                best, worst = result["figures"].get(level), result["worst"].get(level)
                if best is None or figures["tokens_per_s"] > best["tokens_per_s"]:
                    result["figures"][level] = figures
                if worst is None or figures["tokens_per_s"] < worst["tokens_per_s"]:
                    result["worst"][level] = figures
    for result in results:
        result["ttft"] = {level: {**percentiles(ttfts), "requests": len(ttfts)}
                          for level, ttfts in result.pop("ttfts").items()}
    return results


def vllm_python(option: str | None) -> str | None:
    python = option or os.environ.get("FAMILIAL_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        return None
    found = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(not importlib.util.find_spec('vllm'))"],
                           capture_output=True, check=False)
    return python if found.returncode == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 256, one thread, fewer requests and tokens, "
                                                            "vLLM eager (CI)")
    add_arguments(parser, hidden=[256, 512, 1024])
    parser.add_argument("--member", help="member to compare (default: the largest)")
    parser.add_argument("--threads", type=int, nargs="+",
                        help="intra-op threads of each server, one run per count (default: 1 and every core)")
    parser.add_argument("--max-tokens", type=int, help="tokens each request generates")
    parser.add_argument("--rounds", type=int, help="rounds per level (default 3, 2 with --quick)")
    parser.add_argument("--max-prefill-tokens", type=int,
                        help="familial serve's prompt tokens per step (default: its own; vLLM's CPU server takes 2048)")
    parser.add_argument("--vllm-python", help="interpreter with vLLM (default: $FAMILIAL_VLLM_PYTHON, "
                                              "else .venv-vllm/bin/python)")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM with --enforce-eager (quick to start)")
    args = parser.parse_args()
    if args.quick and "--hidden" not in sys.argv:
        args.hidden = [256]
    threads = args.threads or ([1] if args.quick else sorted({1, os.cpu_count() or 1}))

    runs = []
    for shape in [None] if args.family else shapes(args):
        work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
        try:
            family = Path(args.family) if args.family else random_family(work / "random-family", shape)
            label = str(family) if args.family else f"random ({shape.label}; untrained)"
            for count in threads:
                runs.append(run(args, family, label, count, work / f"threads-{count}"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    summary(runs)
    print(json.dumps({"quick": args.quick, "vllm": "eager" if args.quick or args.vllm_eager else "compiled",
                      "runs": runs}))
    return 0


def run(args: argparse.Namespace, family: Path, label: str, threads: int, work: Path) -> dict:
    work.mkdir()
    config = FamilyConfig.load(family)
    member = args.member or f"exit-{config.exits[-1]}"
    max_tokens = args.max_tokens or (32 if args.quick else 64)
    requests = {1: 4, 16: 16, 32: 32} if args.quick else {1: 8, 16: 32, 32: 64}
    lengths = [16, 48, 96, 200]
    context = max(lengths) + max_tokens + 8
    rounds = args.rounds or (2 if args.quick else 3)
    bodies = [workload(config.vocab_size, requests, max_tokens, lengths, seed) for seed in range(rounds + 1)]
    served = without_eos(family, work / "served-family")
    print(f"family: {label}; member {member}; threads per server: {threads}; prompts of {lengths} tokens, "
          f"{max_tokens} new tokens each, greedy; requests per level {requests}", flush=True)

    port = free_port()
    command = [sys.executable, "-m", "familial.cli", "serve", str(served), "--port", str(port), "--threads",
               str(threads), "--max-batch-size", str(max(LEVELS)), "--max-queue", "128",
               "--max-seq-len", str(context),
               *(["--max-prefill-tokens", str(args.max_prefill_tokens)] if args.max_prefill_tokens else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    servers = [(Server("familial", command, port, env, work / "familial.log"), {})]
    try:
        start_vllm(args, family, member, context, threads, work, servers)
        results = measure(servers, member, bodies[1:], warm_up=bodies[0][LEVELS[0]][0])
    finally:
        for server, _ in servers:
            server.stop()
    theirs = results[1] if len(results) > 1 else None
    return report(family, label, member, threads, max_tokens, results[0], theirs)


def start_vllm(args: argparse.Namespace, family: Path, member: str, context: int, threads: int, work: Path,
               servers: list) -> None:
    """Export the member and start vLLM's server on it (appended to `servers`), if vLLM is installed."""
    python = vllm_python(args.vllm_python)
    if python is None:
        print("vLLM: not installed (scripts/test.sh installs it into .venv-vllm); no ratios", flush=True)
    else:
        exported = work / "member"
        if familial_cli(["export", str(family), str(exported), "--member", member]) != 0:
            raise SystemExit("export failed")
        port = free_port()
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(exported),
                   "--served-model-name", member, "--dtype", "float32", "--max-model-len", str(context),
                   "--max-num-seqs", str(max(LEVELS)), "--gpu-memory-utilization", "0.1", "--host", "127.0.0.1",
                   "--port", str(port), *(["--enforce-eager"] if args.quick or args.vllm_eager else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        servers.append((Server("vLLM", command, port, env, work / "vllm.log"),
                        {"ignore_eos": True, "return_token_ids": True}))


def report(family: Path, label: str, member: str, threads: int, max_tokens: int, ours: dict,
           theirs: dict | None) -> dict:
    from tokenizers import Tokenizer

    result = {"family": label, "member": member, "threads": threads, "max_tokens": max_tokens,
              "familial_start_s": ours["start_s"], "levels": {}}
    identical = total = 0
    tokenizer = Tokenizer.from_file(str(family / "tokenizer.json"))
    for level in LEVELS:
        entry = {"familial": ours["figures"][level], "familial_worst": ours["worst"][level],
                 "familial_ttft": ours["ttft"][level]}
        for r in ours["outputs"][level]:
            assert r["tokens"] == max_tokens, f"familial generated {r['tokens']} tokens, not {max_tokens}"
        if theirs is not None:
            entry["vllm"], entry["vllm_worst"], entry["vllm_ttft"] = (theirs["figures"][level], theirs["worst"][level],
                                                                      theirs["ttft"][level])
            entry["ratio_tokens_per_s"] = round(entry["familial"]["tokens_per_s"] / entry["vllm"]["tokens_per_s"], 3)
            # Each side's worst round against the other's: the spread a busy machine leaves.
            entry["ratio_tokens_per_s_worst"] = round(entry["familial_worst"]["tokens_per_s"]
                                                      / entry["vllm_worst"]["tokens_per_s"], 3)
            for statistic in ("p50", "p95"):
                entry[f"ratio_ttft_{statistic}"] = round(entry["familial_ttft"][f"ttft_{statistic}_s"]
                                                         / entry["vllm_ttft"][f"ttft_{statistic}_s"], 3)
            for a, b in zip(ours["outputs"][level], theirs["outputs"][level]):
                assert b["tokens"] == max_tokens, f"vLLM generated {b['tokens']} tokens, not {max_tokens}"
                identical += a["text"] == tokenizer.decode(b["ids"], skip_special_tokens=True)
                total += 1
        result["levels"][str(level)] = entry
    if theirs is not None:
        result["vllm_start_s"] = theirs["start_s"]
        result["identical_outputs"] = f"{identical}/{total}"
    return result


def summary(runs: list[dict]) -> None:
    for run in runs:
        print(f"{run['family']}, {run['threads']} thread(s), familial start {run['familial_start_s']} s"
              + (f", vLLM start {run['vllm_start_s']} s, greedy outputs identical {run['identical_outputs']}"
                 if "vllm_start_s" in run else ""), flush=True)
        for level, entry in run["levels"].items():
            if "ratio_tokens_per_s" in entry:
                print(f"  concurrency {level:>2}: familial/vLLM tokens/s {entry['ratio_tokens_per_s']:.2f}x "
                      f"(worst rounds {entry['ratio_tokens_per_s_worst']:.2f}x), TTFT (all rounds) p50 "
                      f"{entry['ratio_ttft_p50']:.2f}x, p95 {entry['ratio_ttft_p95']:.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
