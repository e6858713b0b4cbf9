"""Sweep of the demo's DaE stage: how long and how fast to train the new blocks.

Takes the family and data of a finished `familial demo` run and repeats the demo's DaE stage
(`familial.demo.dae.run_dae`: expand the smallest member, train only the new blocks and its
head and norm, SVD-LLM v2 on the new blocks) for several step counts and learning rates, on
one thread. Each point prints the smallest member's held-out loss before expansion, after
training and after compression, the next member's loss, the share of the DaE gain that
compression keeps, and the CPU seconds the training took.

    python bench/demo_dae_sweep.py --demo runs/demo [--points 150:2e-3,300:2e-3]

The last line printed is one JSON object of the points run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from familial.checkpoint_io import load_family
from familial.data.shards import TokenShards
from familial.demo.dae import run_dae
from familial.demo.recipe import FULL
from familial.eval.perplexity import evaluate_held_out

DEFAULT_POINTS = "150:1e-3,150:3e-3,300:1e-3,300:3e-3"


def member_loss(model, exit_layer: int, held_out: TokenShards) -> tuple[float, float]:
    """(mean loss, target tokens) of one member on the demo's held-out windows."""
    result = evaluate_held_out(model, held_out, FULL.seq_len, FULL.eval_tokens, exits=[exit_layer])
    return float(result.loss_sums.sum() / result.counts.sum()), float(result.counts.sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="output directory of a demo run")
    parser.add_argument("--points", default=DEFAULT_POINTS, help="steps:lr pairs, comma-separated")
    parser.add_argument("--work", default="bench/out/demo_dae_sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    demo = Path(args.demo)
    family_dir = demo / "run" / "family"
    data_dirs = sorted(p for p in demo.glob("data-*") if (p / "held_out" / "manifest.json").is_file())
    if not family_dir.is_dir() or not data_dirs:
        parser.error(f"{demo}: no finished demo run there (run `familial demo --output {demo}` first)")
    data_dir = data_dirs[-1]
    held_out = TokenShards(data_dir / "held_out")
    family = load_family(family_dir).eval()
    small, following = family.config.exits[:2]
    (before, tokens), (next_loss, _) = member_loss(family, small, held_out), member_loss(family, following, held_out)
    print(f"{'steps':>5} {'lr':>7} {'before':>7} {'trained':>8} {'compressed':>10} {'next member':>11} "
          f"{'gain kept':>9} {'CPU s':>6}")
    rows = {}
    for point in args.points.split(","):
        steps, lr = point.split(":")
        plan = replace(FULL, dae_steps=int(steps), dae_lr=float(lr))
        started = time.process_time()
        result = run_dae(plan, family_dir, data_dir, Path(args.work) / point.replace(":", "-"), seed=0)
        cpu = time.process_time() - started
        trained, compressed = (float(result.loss[k].sum()) / tokens for k in ("trained", "compressed"))
        kept = (before - compressed) / (before - trained) if before != trained else float("nan")
        rows[point] = {"before": before, "trained": trained, "compressed": compressed,
                       "next_member": next_loss, "gain_kept": kept, "cpu_s": cpu}
        print(f"{steps:>5} {lr:>7} {before:>7.3f} {trained:>8.3f} {compressed:>10.3f} {next_loss:>11.3f} "
              f"{kept:>9.1%} {cpu:>6.0f}", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
