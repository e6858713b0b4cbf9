"""Tiny token shards and train configs for the trainer's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from familial.data import write_shards

VOCAB = 53


def write_random_shards(path: Path, seed: int = 0, documents: int = 40, mask: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(documents):
        # A learnable pattern (counting mod VOCAB from a random start) so loss can fall.
        start, length = rng.integers(0, VOCAB), rng.integers(8, 30)
        ids = (start + np.arange(length)) % VOCAB
        docs.append(ids)
    write_shards(path, docs, vocab_size=VOCAB, eos_token_id=0)
    return path


def tiny_config_dict(tmp_path: Path, shards: Path, steps: int = 6, **top) -> dict:
    config = {
        "run_dir": str(tmp_path / "run"),
        "steps": steps,
        "seed": 3,
        "init": {"model": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 4, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "exits": [1, 2, 3],
                           "max_position_embeddings": 64}},
        "data": {"sources": [{"path": str(shards)}], "seq_len": 16, "batch_size": 2,
                 "grad_accum": 2},
        "lr": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "loss": {"chunk_size": 13, "lambdas": {"1": 0.5},
                 "distill": {"2": {"kind": "linear", "start": 0.5, "end": 0.0, "end_step": 6}}},
        "log": {"progress": False, "tensorboard": False},
    }
    config.update(top)
    return config


@pytest.fixture
def make_config():
    """tiny_config_dict(tmp_path, shards, steps=..., **top-level fields) -> a config dict."""
    return tiny_config_dict


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_random_shards(tmp_path / "shards")
