"""Sweep of the demo's DaE stage: how long and how fast to train the new blocks.

Takes the family and data of a finished `familial demo` run and repeats the demo's DaE stage
(`familial.demo.dae.run_dae`: expand the smallest member, train only the new blocks and its
head and norm, SVD-LLM v2 on the new blocks, heal the thin matrices) for several step counts,
learning rates, compression ratios and healing budgets, on one thread. Each point prints the
smallest member's held-out loss before expansion, after training, after compression and after
healing, the next member's loss, the share of the DaE gain that compression keeps before and
after healing, and the CPU seconds of the whole stage.

    python bench/demo_dae_sweep.py --demo runs/demo [--points 1500:1e-3:0.4:0,1500:1e-3:0.3:600:5e-4]

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

DEFAULT_POINTS = "600:1e-3:0.3:0,1500:1e-3:0.3:0,1500:1e-3:0.3:600:5e-4,1500:1e-3:0.4:1000:3e-4"


def member_loss(model, exit_layer: int, held_out: TokenShards) -> tuple[float, float]:
    """(mean loss, target tokens) of one member on the demo's held-out windows."""
    result = evaluate_held_out(model, held_out, FULL.seq_len, FULL.eval_tokens, exits=[exit_layer])
    return float(result.loss_sums.sum() / result.counts.sum()), float(result.counts.sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="output directory of a demo run")
    parser.add_argument("--points", default=DEFAULT_POINTS,
                        help="steps:lr[:compress ratio[:healing steps[:healing lr]]], comma-separated "
                             "(the recipe's values where left out)")
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
    print(f"{'steps':>5} {'lr':>7} {'ratio':>5} {'heal':>9} {'before':>7} {'trained':>8} {'compressed':>10} "
          f"{'healed':>7} {'next member':>11} {'kept':>6} {'healed kept':>11} {'CPU s':>6}")
    rows = {}
    for point in args.points.split(","):
        steps, lr, *rest = point.split(":")
        ratio = float(rest[0]) if rest else FULL.compress_ratio
        heal_steps = int(rest[1]) if len(rest) > 1 else FULL.heal_steps
        heal_lr = float(rest[2]) if len(rest) > 2 else FULL.heal_lr
        plan = replace(FULL, dae_steps=int(steps), dae_lr=float(lr), compress_ratio=ratio,
                       heal_steps=heal_steps, heal_lr=heal_lr)
        started = time.process_time()
        result = run_dae(plan, family_dir, data_dir, Path(args.work) / point.replace(":", "-"), seed=0)
        cpu = time.process_time() - started
        trained, compressed, healed = (float(result.loss[k].sum()) / tokens
                                       for k in ("trained", "compressed", "healed"))
        gain = before - trained
        kept, healed_kept = ((before - x) / gain if gain else float("nan") for x in (compressed, healed))
        rows[point] = {"steps": int(steps), "lr": float(lr), "ratio": ratio, "heal_steps": heal_steps,
                       "heal_lr": heal_lr, "before": before, "trained": trained, "compressed": compressed,
                       "healed": healed, "next_member": next_loss, "gain_kept": kept,
                       "healed_gain_kept": healed_kept, "cpu_s": cpu}
        heal = f"{heal_steps}@{heal_lr:g}" if heal_steps else "-"
        print(f"{steps:>5} {lr:>7} {ratio:>5} {heal:>9} {before:>7.3f} {trained:>8.3f} {compressed:>10.3f} "
              f"{healed:>7.3f} {next_loss:>11.3f} {kept:>6.1%} {healed_kept:>11.1%} {cpu:>6.0f}", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
