"""`familial exits cache | train | eval CONFIG.toml [--key.sub VALUE ...]`: exits for a frozen
pretrained trunk (see examples/pretrained/smollm2_exits.toml).

`cache` runs the trunk once over the training tokens (and the held-out tokens, if given) and
writes the exit cache; `train` trains only the branches from it and writes the family to
`output`; `eval` prints a family's held-out figures per exit from the held-out cache. `train`
and `eval` print one JSON object as their last line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from familial.config import ConfigError, from_dict
from familial.train.branches import BranchTrainConfig
from familial.train.config import parse_overrides, read_toml, set_dotted


@dataclass
class CacheConfig:
    # token shards (`familial data prepare`) the branches train on, and the cache to write.
    data: str
    path: str
    # held-out token shards for the before/after figures, cached at `<path>-held-out`.
    held_out: str | None = None
    seq_len: int = 256
    # cap on the training targets cached (None: all of `data`), and on the held-out ones.
    tokens: int | None = None
    held_out_tokens: int | None = 16384
    # the full member's most likely tokens kept per position as the teacher.
    top_k: int = 32
    # storage of the states entering the exits.
    hidden_dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = 4


@dataclass
class ExitsConfig:
    # the family whose branches train (import one with `familial import ... --exits ...`).
    family: str
    # where `train` writes the trained family.
    output: str
    cache: CacheConfig
    train: BranchTrainConfig = field(default_factory=BranchTrainConfig)
    # `train` measures the held-out figures before training too (`familial exits eval` gives
    # them on their own, e.g. in a process beside the training).
    evaluate_before: bool = True
    # torch intra-op threads (default: picked for this machine).
    threads: int | None = None
    overwrite: bool = False

    @property
    def held_out_path(self) -> Path:
        path = Path(self.cache.path)
        return path.with_name(f"{path.name}-held-out")


def load_exits_config(path: str, overrides: list[str]) -> ExitsConfig:
    file = Path(path)
    data = copy.deepcopy(read_toml(file, "a TOML exits config"))
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, value, root=ExitsConfig)
    config = from_dict(ExitsConfig, data, str(file))
    config.train.validate(f"{file}: [train]")
    return config


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["cache", "train", "eval"],
                        help="cache: run the frozen trunk once; train: train the branches from the cache; "
                             "eval: held-out figures per exit")
    parser.add_argument("config", help="TOML config (see examples/pretrained/smollm2_exits.toml)")
    parser.add_argument("options", nargs=argparse.REMAINDER, metavar="...",
                        help="config overrides --key.sub VALUE (e.g. --train.lr 3e-4 --cache.tokens 65536)")


def _set_threads(config: ExitsConfig) -> None:
    from familial.threads import pick_threads

    threads = config.threads or pick_threads()[0]
    torch.set_num_threads(threads)
    print(f"threads: {threads}", file=sys.stderr, flush=True)


def _progress(what: str):
    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) < 4:
            print(f"{what}: {done}/{total} rows", file=sys.stderr, flush=True)
    return report


def run(args: argparse.Namespace) -> int:
    from familial.checkpoint_io import load_family, save_family
    from familial.data.shards import open_shards
    from familial.train.branches import evaluate_exits, train_branches
    from familial.train.exit_cache import ExitCache, write_exit_cache

    config = load_exits_config(args.config, args.options)
    _set_threads(config)
    model = load_family(config.family, dtype=torch.float32)
    spec = config.cache
    if args.action == "cache":
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
    exits = list(config.train.exits or ExitCache(spec.path).spec.exits)
    held_out = ExitCache(config.held_out_path) if config.held_out_path.is_dir() else None
    if held_out is not None:
        held_out.check_family(model, exits, config.family)
    if args.action == "eval":
        if held_out is None:
            raise ConfigError(f"{config.held_out_path}: no held-out cache (set cache.held_out and run "
                              f"`familial exits cache`)")
        print(json.dumps(evaluate_exits(model, held_out, exits)))
        return 0
    cache = ExitCache(spec.path)
    cache.check_family(model, exits, config.family)
    from familial.staging import check_output_directory

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
