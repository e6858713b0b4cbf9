"""Tiny families, token shards, training configs and fault helpers for the reliability tests."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from familial.config import FamilyConfig
from familial.data import write_shards
from familial.model import FamilyModel

VOCAB = 61
# No launch may take longer than this; a hang fails the test instead of blocking CI.
LAUNCH_LIMIT_S = 180


def tiny_family_config(**overrides) -> FamilyConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, exits=[1, 3],
                  max_position_embeddings=64)
    fields.update(overrides)
    return FamilyConfig(**fields)


def tiny_family(seed: int = 0, **overrides) -> FamilyModel:
    torch.manual_seed(seed)
    return FamilyModel(tiny_family_config(**overrides))


def write_counting_shards(path: Path, seed: int = 0, documents: int = 40, vocab: int = VOCAB) -> Path:
    """Documents that count upwards mod `vocab` from a random start: learnable, so losses move."""
    rng = np.random.default_rng(seed)
    docs = [(rng.integers(0, vocab) + np.arange(rng.integers(8, 30))) % vocab for _ in range(documents)]
    write_shards(path, docs, vocab_size=vocab, eos_token_id=0)
    return path


def train_config_dict(run_dir: Path, shards: Path, steps: int = 6, **top) -> dict:
    """A complete training config for a 4-layer, 3-exit family on CPU (seconds per run)."""
    config = {
        "run_dir": str(run_dir),
        "steps": steps,
        "seed": 5,
        "init": {"model": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 4, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "exits": [1, 2, 3],
                           "max_position_embeddings": 64}},
        "data": {"sources": [{"path": str(shards)}], "seq_len": 16, "batch_size": 2, "grad_accum": 2},
        "lr": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "loss": {"chunk_size": 13, "lambdas": {"1": 0.5}},
        "log": {"progress": False, "tensorboard": False},
    }
    config.update(top)
    return config


def leftovers(directory: Path) -> list[str]:
    """Hidden staging/trash entries a failed atomic write could leave behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # JSON's strings, numbers and true/false are TOML too


def write_toml(path: Path, config: dict) -> Path:
    """A config dict as TOML (nested tables inline), for the `familial train` command."""
    path.write_text("".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in config.items()))
    return path


class _FillingFile:
    """A file that takes `room` more bytes, then fails as a full disk does."""

    def __init__(self, handle, room: list[int]) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data.encode())
        if size > self.room[0]:
            self.handle.write(data[:self.room[0]] if isinstance(data, (str, bytes)) else bytes(data)[:self.room[0]])
            self.room[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no file name, like write(2)'s
        self.room[0] -= size
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def disk_full_open(room: int):
    """An `open` (patch it into a writer's module) whose files share `room` bytes of disk."""
    left = [room]

    def fake_open(*args, **kwargs):
        return _FillingFile(open(*args, **kwargs), left)
    return fake_open
def launch(script: Path, spec: dict, *argv: str, nproc: int | None = None,
           restarts: int = 0) -> tuple[int, str, float]:
    """Run `script SPEC ARGV...` under torchrun with `nproc` gloo processes (None: one plain
    process); its exit code, output and seconds. A hang fails the test."""
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
              f"--max-restarts={restarts}"] if nproc else []
    command = [sys.executable, *runner, str(script), json.dumps(spec), *map(str, argv)]
    started = time.monotonic()
    process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{command[1:]} hung for {LAUNCH_LIMIT_S}s:\n{process.communicate()[0][-3000:]}")
    return process.returncode, output, time.monotonic() - started
