"""`familial exits cache | train | eval CONFIG.toml [--key.sub VALUE ...]`: exits for a frozen
pretrained trunk (see examples/pretrained/smollm2_exits.toml; the config is
`familial.train.exits_config.ExitsConfig`).

`cache` runs the trunk once over the training tokens (and the held-out tokens, if given) and
writes the exit cache; `train` trains only the branches from it and writes the family to
`output`; `eval` prints a family's held-out figures per exit from the held-out cache. `train`
and `eval` print one JSON object as their last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from familial.commands import arguments
from familial.config import ConfigError
from familial.train.exits_config import ExitsConfig, load_exits_config


def _exits_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML config (see examples/pretrained/smollm2_exits.toml)")
    parser.add_argument("options", nargs=argparse.REMAINDER, metavar="...",
                        help="config overrides --key.sub VALUE (e.g. --train.lr 3e-4 --cache.tokens 65536)")


def _set_threads(config: ExitsConfig) -> None:
    from familial.threads import pick_threads

    threads = config.threads or pick_threads()[0]
    torch.set_num_threads(threads)
    print(f"threads: {threads}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace):
    """-> (config, the family), with the threads set for this machine."""
    from familial.checkpoint_io import load_family

    config = load_exits_config(args.config, args.options)
    _set_threads(config)
    from familial.allocator import retain_freed_memory
    retain_freed_memory()
    return config, load_family(config.family, dtype=torch.float32)


def _progress(what: str):
    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) < 4:
            print(f"{what}: {done}/{total} rows", file=sys.stderr, flush=True)
    return report


@arguments(_exits_arguments)
def cache(args: argparse.Namespace) -> int:
    from familial.data.shards import open_shards
    from familial.train.exit_cache import write_exit_cache

    config, model = _load(args)
    spec = config.cache
    jobs = [(spec.data, spec.path, spec.tokens)]
    if spec.held_out:
        jobs.append((spec.held_out, config.held_out_path, spec.held_out_tokens))
    for data, path, tokens in jobs:
        written = write_exit_cache(model, open_shards(data), path, seq_len=spec.seq_len, max_tokens=tokens,
                                   top_k=spec.top_k, hidden_dtype=spec.hidden_dtype,
                                   batch_size=spec.batch_size, overwrite=config.overwrite,
                                   progress=_progress(str(path)))
        print(f"wrote {path}: {written.rows} rows of {written.seq_len} tokens, exits {written.exits}, "
              f"top-{written.top_k}")
    return 0


def _exits_and_held_out(config: ExitsConfig, model):
    """-> (the exits to train or evaluate, the held-out cache checked against the family, or None)."""
    from familial.train.exit_cache import ExitCache

    exits = list(config.train.exits or ExitCache(config.cache.path).spec.exits)
    held_out = ExitCache(config.held_out_path) if config.held_out_path.is_dir() else None
    if held_out is not None:
        held_out.check_family(model, exits, config.family)
    return exits, held_out


@arguments(_exits_arguments)
def train(args: argparse.Namespace) -> int:
    from familial.checkpoint_io import save_family
    from familial.staging import check_output_directory
    from familial.train.branches import evaluate_exits, train_branches
    from familial.train.exit_cache import ExitCache

    config, model = _load(args)
    exits, held_out = _exits_and_held_out(config, model)
    cache = ExitCache(config.cache.path)
    cache.check_family(model, exits, config.family)
    check_output_directory(Path(config.output), config.overwrite)
    summary = {}
    if held_out is not None and config.evaluate_before:
        summary["before"] = evaluate_exits(model, held_out, exits)
    summary["train"] = train_branches(model, cache, config.train)
    if held_out is not None:
        summary["after"] = evaluate_exits(model, held_out, exits, truncated=False)
    save_family(model, config.output, tokenizer_source=config.family, overwrite=config.overwrite)
    print(f"wrote {config.output}")
    print(json.dumps(summary))
    return 0


@arguments(_exits_arguments)
def evaluate(args: argparse.Namespace) -> int:
    from familial.train.branches import evaluate_exits

    config, model = _load(args)
    exits, held_out = _exits_and_held_out(config, model)
    if held_out is None:
        raise ConfigError(f"{config.held_out_path}: no held-out cache (set cache.held_out and run "
                          f"`familial exits cache`)")
    print(json.dumps(evaluate_exits(model, held_out, exits)))
    return 0
