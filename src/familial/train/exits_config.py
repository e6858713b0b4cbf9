"""The TOML config of `familial exits` (see examples/pretrained/smollm2_exits.toml): the exit
cache to write from a frozen trunk, and the training of its branches from that cache."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from familial import checks
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

    def validate(self, where: str) -> None:
        def name(key: str) -> str:
            return checks.field(where, key)

        for key in ("seq_len", "top_k", "batch_size"):
            checks.positive_int(name(key), getattr(self, key), error=ConfigError)
        for key in ("tokens", "held_out_tokens"):
            if getattr(self, key) is not None:
                checks.integer(name(key), getattr(self, key), f"at least seq_len ({self.seq_len}), or omitted",
                               minimum=self.seq_len, error=ConfigError)


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

    def validate(self, where: str) -> None:
        if self.threads is not None:
            checks.positive_int(checks.field(where, "threads"), self.threads, error=ConfigError)
        self.cache.validate(f"{where}: [cache]")
        self.train.validate(f"{where}: [train]")

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
    config.validate(str(file))
    return config
