"""`familial train CONFIG.toml [--key.sub value ...]` and `familial plot RUN_DIR`."""

from __future__ import annotations

import argparse

import torch

from familial.train.config import load_config


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    if command == "plot":
        parser.add_argument("run_dir", help="a training run directory (holds metrics.jsonl)")
        parser.add_argument("--output", help="PNG path (default RUN_DIR/loss.png)")
        return
    parser.add_argument("config", help="TOML training config")
    parser.add_argument("options", nargs=argparse.REMAINDER, metavar="...",
                        help="--resume [CHECKPOINT] (default: the run directory's latest), "
                             "--threads N (torch CPU threads), and config overrides "
                             "--key.sub VALUE (e.g. --lr.lr 1e-3 --steps 200)")


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


def run(args: argparse.Namespace) -> int:
    if args.command == "plot":
        from familial.train.plot import plot_run

        print(f"wrote {plot_run(args.run_dir, args.output)}")
        return 0
    from familial.train.loop import Trainer

    resume, threads, overrides = split_options(args.options)
    config = load_config(args.config, overrides)
    if threads:
        torch.set_num_threads(threads)
    from familial.parallel.loop import is_parallel_launch, run_parallel

    if is_parallel_launch(config):
        return run_parallel(config, resume=resume)
    trainer = Trainer(config, resume=resume)
    state = trainer.run()
    print(f"done: {state.step} steps ({state.skipped} skipped); family checkpoint: "
          f"{trainer.final_family()}")
    return 0
