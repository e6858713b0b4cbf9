"""Tokens/s of `familial data prepare` against Megatron's way of preparing data, in one run.

The baseline follows Megatron-LM's tools/preprocess_data.py recipe (written here, not
copied): a `multiprocessing.Pool` of workers (fork, Linux's default) maps `json.loads` plus
one `encode` per JSONL line over the file with `imap(..., chunksize=32)`, appends the EOD
token, and the parent writes each document with megatron-core's own `IndexedDatasetBuilder`
(dtype uint16 below 65500 ids, as its `DType.optimal_dtype` picks). It calls the same
`tokenizers` tokenizer directly (Megatron reaches it through transformers, which only adds
time), so the baseline is the recipe at its fastest.

Both read the same JSONL (Python source files, one per line, from this interpreter's
standard library and then its site-packages: text that is on every machine; cached under
bench/out/) with the shipped tokenizer, and must write the same token ids (checked).
Headline: `data prepare --workers 2` over the baseline with 2 workers; then how ours scales
with workers 1..cores. TOKENIZERS_PARALLELISM=false for every run, so N workers use N cores
and `--workers 1` is one thread. Timings alternate between the two round by round and keep
each one's best round. Beside each time go the CPU seconds of the run (its processes and
workers together), which a busy machine disturbs less than wall time: CPU that stays flat
as workers are added means scaling close to linear wherever the cores are free.
Last line: JSON of all figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import numpy as np

from familial.cli import main as familial
from familial.data.demo_corpus import TOKENIZER_PATH
from familial.data.shards import TokenShards, open_shards

OUT = Path(__file__).parent / "out"
EOS = "<|endoftext|>"


def corpus(megabytes: float) -> Path:
    """~`megabytes` of JSONL, one Python source file per line, cached."""
    path = OUT / f"data-corpus-{megabytes:g}MB.jsonl"
    if path.is_file():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    target, written = megabytes * 1e6, 0
    staging = path.with_suffix(".tmp")
    with open(staging, "w", encoding="utf-8") as out:
        for file in (f for root in roots for f in sorted(root.rglob("*.py"))):
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                written += len(line)
                if written >= target:
                    break
    staging.rename(path)
    return path


class MegatronEncoder:
    """The worker side of the recipe: the tokenizer lives in each worker's globals."""

    tokenizer = None

    def __init__(self, tokenizer_path: str) -> None:
        self.tokenizer_path = tokenizer_path

    def initializer(self) -> None:
        from tokenizers import Tokenizer

        MegatronEncoder.tokenizer = Tokenizer.from_file(self.tokenizer_path)
        MegatronEncoder.eod = MegatronEncoder.tokenizer.token_to_id(EOS)

    def encode(self, line: str) -> tuple[list[int], list[int], int]:
        text = json.loads(line)["text"]
        ids = MegatronEncoder.tokenizer.encode(text, add_special_tokens=False).ids
        lengths = [len(ids)] if ids else []
        if ids:
            ids.append(MegatronEncoder.eod)
            lengths[-1] += 1
        return ids, lengths, len(line)


def megatron_prepare(source: Path, prefix: Path, workers: int) -> None:
    from megatron.core.datasets import indexed_dataset
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(TOKENIZER_PATH)).get_vocab_size()
    encoder = MegatronEncoder(str(TOKENIZER_PATH))
    with open(source, encoding="utf-8") as lines:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=encoder.initializer)
        encoded = pool.imap(encoder.encode, lines, 32)
        builder = indexed_dataset.IndexedDatasetBuilder(
            f"{prefix}.bin", dtype=indexed_dataset.DType.optimal_dtype(vocab))
        for ids, lengths, _ in encoded:
            builder.add_document(ids, lengths)
        builder.finalize(f"{prefix}.idx")
        pool.close()
        pool.join()


def ours_prepare(source: Path, out: Path, workers: int) -> None:
    code = familial(["data", "prepare", str(source), "--tokenizer", str(TOKENIZER_PATH),
                     "--out", str(out), "--workers", str(workers), "--eos-token", EOS,
                     "--no-progress", "--overwrite"])
    if code:
        raise SystemExit(f"data prepare failed with exit code {code}")
    # Stop multiprocessing's fork server (a private helper its own tests use), so every run
    # starts its own as a CLI run does, and the CPU time of it and its workers is counted.
    from multiprocessing import forkserver

    forkserver._forkserver._stop()


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool workers are joined)."""
    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run."""
    start, cpu = time.perf_counter(), cpu_seconds()
    run(*args)
    return time.perf_counter() - start, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 MB, one round (under a minute)")
    parser.add_argument("--megabytes", type=float, help="size of the JSONL (default 50)")
    parser.add_argument("--rounds", type=int, help="timed rounds per contender (default 2)")
    args = parser.parse_args()
    # Read by `tokenizers` at each call, and inherited by every worker of both contenders.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    megabytes = args.megabytes or (3 if args.quick else 50)
    rounds = args.rounds or (1 if args.quick else 2)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with warnings.catch_warnings():   # "Transformer Engine and Apex are not installed"
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset  # noqa: F401
    source = corpus(megabytes)
    work = OUT / "data-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load = os.getloadavg()[0]
    print(f"{source.name}: {source.stat().st_size / 1e6:.1f} MB, {cores} cores, "
          f"load average {load:.1f} before the runs")

    ours, baseline = [], []
    for _ in range(rounds):
        baseline.append(timed(megatron_prepare, source, work / "megatron", 2))
        ours.append(timed(ours_prepare, source, work / "ours", 2))
    tokens = TokenShards(work / "ours").num_tokens
    same = np.array_equal(open_shards(work / "megatron").tokens, TokenShards(work / "ours").tokens)
    ours_rate, baseline_rate = tokens / min(ours)[0], tokens / min(baseline)[0]
    ours_cpu, baseline_cpu = min(cpu for _, cpu in ours), min(cpu for _, cpu in baseline)
    print(f"megatron recipe, 2 workers: {baseline_rate:,.0f} tokens/s, {baseline_cpu:.1f} CPU s")
    print(f"data prepare --workers 2:   {ours_rate:,.0f} tokens/s, {ours_cpu:.1f} CPU s "
          f"({ours_rate / baseline_rate:.2f}x the tokens/s; same token ids: {same})")

    scaling, cpu = {}, {}
    for workers in range(1, cores + 1):
        runs = [timed(ours_prepare, source, work / "ours", workers) for _ in range(rounds)]
        scaling[workers] = tokens / min(wall for wall, _ in runs)
        cpu[workers] = min(seconds for _, seconds in runs)
        print(f"data prepare --workers {workers}: {scaling[workers]:,.0f} tokens/s "
              f"({scaling[workers] / scaling[1]:.2f}x of one worker), {cpu[workers]:.1f} CPU s")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "bench": "data", "megabytes": round(source.stat().st_size / 1e6, 1), "tokens": tokens,
        "cores": cores, "load_average_before": round(load, 2), "rounds": rounds,
        "tokenizer_threads_per_worker": 1,
        "megatron_recipe_tokens_per_s": round(baseline_rate),
        "ours_tokens_per_s": round(ours_rate),
        "ratio_ours_over_megatron": round(ours_rate / baseline_rate, 3),
        "megatron_recipe_cpu_s": round(baseline_cpu, 2), "ours_cpu_s": round(ours_cpu, 2),
        "same_token_ids": bool(same),
        "ours_tokens_per_s_by_workers": {str(k): round(v) for k, v in scaling.items()},
        "ours_cpu_s_by_workers": {str(k): round(v, 2) for k, v in cpu.items()},
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
