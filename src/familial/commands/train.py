"""`familial train CONFIG.toml [--key.sub value ...]` and `familial plot RUN_DIR`.

The command picks the layout: one process (`familial.train.layout.LocalLayout`), or, under
torchrun with several processes, `familial.parallel.layout.ParallelLayout`; the trainer's
loop is the same for both. It prints the family's path (RUN_DIR/family) as its last line.
"""

from __future__ import annotations

import argparse
import os

import torch

from familial.commands import arguments
from familial.train.config import load_config


def split_options(items: list[str]) -> tuple[str | None, int | None, list[str]]:
    """-> (resume, threads, overrides) from the words after the config path."""
    resume, threads, overrides, i = None, None, [], 0
    while i < len(items):
        if items[i] == "--resume":
            has_value = i + 1 < len(items) and not items[i + 1].startswith("--")
            resume = items[i + 1] if has_value else "latest"
            i += 2 if has_value else 1
        elif items[i] == "--threads" and i + 1 < len(items) and items[i + 1].isdigit():
            threads, i = int(items[i + 1]), i + 2
        else:
            overrides.append(items[i])
            i += 1
    return resume, threads, overrides


def _threads(config, requested: int | None) -> str:
    """Set torch's intra-op threads for one process; returns what was picked and why."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"threads: {torch.get_num_threads()} per process (torchrun's OMP_NUM_THREADS)"
    if requested:
        torch.set_num_threads(requested)
        return f"threads: {requested} (--threads)"
    from familial.threads import pick_threads

    model = config.init.model
    threads, why = pick_threads(model.hidden_size if model else None, model.num_hidden_layers if model else None)
    torch.set_num_threads(threads)
    return f"threads: {threads} ({why}; --threads N to override)"


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML training config")
    parser.add_argument("options", nargs=argparse.REMAINDER, metavar="...",
                        help="--resume [CHECKPOINT] (default: the run directory's newest checkpoint, of either "
                             "kind), --threads N (torch CPU threads; default: picked for this machine), and "
                             "config overrides --key.sub VALUE (e.g. --lr.lr 1e-3 --steps 200)")


@arguments(_train_arguments)
def train(args: argparse.Namespace) -> int:
    from familial.train.loop import Trainer

    resume, threads, overrides = split_options(args.options)
    config = load_config(args.config, overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from familial.parallel.layout import ParallelLayout as layout
    else:
        from familial.train.layout import LocalLayout as layout
    chosen = _threads(config, threads)
    trainer = Trainer(config, resume=resume, layout=layout)
    if trainer.layout.is_main:
        print(chosen, flush=True)
    state = trainer.run()
    family = trainer.finish()
    if family is not None:
        print(f"done: {state.step} steps ({state.skipped} skipped); the family (for `familial export`, "
              f"`load_family`) is at:", flush=True)
        print(family, flush=True)
    return 0


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--output", help="PNG path (default RUN_DIR/loss.png)")


@arguments(_plot_arguments)
def plot(args: argparse.Namespace) -> int:
    from familial.train.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.output)}")
    return 0
