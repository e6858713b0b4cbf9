"""The demo's recipe: the family's shape and how it trains, as plain data.

Every value in `FULL` was chosen from short measured sweeps on 2-core CPU machines
(`bench/demo_sweep.py`; the table and the reasoning are in docs/demo.md), not by guessing.
`QUICK` is the same recipe shrunk until the test suite can afford it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoPlan:
    # The corpus: standard library files up to `corpus_bytes`, every `held_out_every`-th
    # file held out, tokenised by a BPE of `vocab_size` ids fitted to the training files.
    corpus_bytes: int = 3_400_000
    held_out_every: int = 10
    vocab_size: int = 384
    # The family: exits of a `layers`-deep trunk, one branch layer per early exit.
    hidden_size: int = 96
    intermediate_size: int = 288
    layers: int = 6
    heads: int = 2
    kv_heads: int = 1
    exits: tuple[int, ...] = (0, 1, 3, 5)
    names: tuple[str, ...] = ("tiny", "small", "medium", "full")
    # Joint training.
    steps: int = 3000
    seq_len: int = 128
    batch_size: int = 4
    lr: float = 7e-4
    min_lr: float = 1e-4
    warmup_steps: int = 60
    lr_kind: str = "wsd"
    decay_fraction: float = 0.3
    weight_decay: float = 0.05
    # lambda per member name: a constant, or (start, end) of a warm_decay that holds
    # `start` for the first `exit_decay_from` of the steps, then decays to `end`.
    exit_weights: dict[str, Any] = field(default_factory=dict)
    exit_decay_from: float = 0.25
    # DaE on the smallest member: blocks appended, steps and rate training only them, share
    # of the added blocks' parameters SVD-LLM v2 removes afterwards, then steps and rate
    # training the thin matrices that replace them (and the head and norm) to heal the
    # truncation (bench/demo_dae_sweep.py; docs/demo.md).
    dae_blocks: int = 3
    dae_steps: int = 1500
    dae_lr: float = 1e-3
    compress_ratio: float = 0.3
    calibration_sequences: int = 64
    heal_steps: int = 600
    heal_lr: float = 5e-4
    # Evidence and samples.
    eval_tokens: int = 200_000
    bootstrap: int = 2000
    sample_tokens: int = 48


FULL = DemoPlan()
QUICK = DemoPlan(corpus_bytes=500_000, held_out_every=10, vocab_size=1024, hidden_size=64,
                 intermediate_size=192, heads=2, kv_heads=1, layers=4, exits=(1, 3),
                 names=("small", "full"), steps=40, seq_len=64, batch_size=8, warmup_steps=4,
                 dae_blocks=1, dae_steps=10, calibration_sequences=16, heal_steps=5, eval_tokens=8192,
                 bootstrap=300, sample_tokens=12)


def model_config(plan: DemoPlan) -> dict[str, Any]:
    return {"vocab_size": plan.vocab_size, "hidden_size": plan.hidden_size,
            "intermediate_size": plan.intermediate_size, "num_hidden_layers": plan.layers,
            "num_attention_heads": plan.heads, "num_key_value_heads": plan.kv_heads,
            "exits": list(plan.exits), "max_position_embeddings": max(1024, plan.seq_len),
            "rope_theta": 10000.0, "eos_token_id": 0, "pad_token_id": 0,
            "member_names": dict(zip(plan.names, plan.exits))}


def lambdas(plan: DemoPlan, steps: int) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name, weight in plan.exit_weights.items():
        if isinstance(weight, (int, float)):
            table[name] = float(weight)
        else:
            start, end = weight
            table[name] = {"kind": "warm_decay", "start": start, "end": end,
                           "start_step": int(steps * plan.exit_decay_from), "end_step": steps}
    return table


def train_config(plan: DemoPlan, data_dir: Path, run_dir: Path, tokenizer_dir: Path,
                 seed: int) -> dict[str, Any]:
    """The joint training run of every member, as a `familial train` config."""
    return {
        "run_dir": str(run_dir), "steps": plan.steps, "seed": seed,
        "init": {"tokenizer": str(tokenizer_dir), "model": model_config(plan)},
        "data": {"sources": [{"path": str(data_dir / "train")}], "seq_len": plan.seq_len,
                 "batch_size": plan.batch_size},
        "lr": {"lr": plan.lr, "min_lr": plan.min_lr, "warmup_steps": plan.warmup_steps,
               "kind": plan.lr_kind, "decay_fraction": plan.decay_fraction},
        "optim": {"weight_decay": plan.weight_decay},
        "loss": {"chunk_size": 1024, "lambdas": lambdas(plan, plan.steps)},
        "checkpoint": {"keep": 1},
        "log": {"tensorboard": False},
    }


def dae_config(plan: DemoPlan, family_dir: Path, data_dir: Path, run_dir: Path, member: str,
               frozen: list[str], seed: int, steps: int, lr: float) -> dict[str, Any]:
    """Training of the expanded member's new blocks (and its head and norm) alone."""
    return {
        "run_dir": str(run_dir), "steps": steps, "seed": seed,
        "init": {"family": str(family_dir)},
        "data": {"sources": [{"path": str(data_dir / "train")}], "seq_len": plan.seq_len,
                 "batch_size": plan.batch_size},
        "lr": {"lr": lr, "min_lr": plan.min_lr, "warmup_steps": max(steps // 10, 1), "kind": "cosine"},
        "optim": {"weight_decay": 0.0},
        # Only the expanded member's loss: the other exits would only cost time.
        "loss": {"chunk_size": 1024, "default_lambda": 0.0, "lambdas": {member: 1.0}},
        "freeze": frozen,
        "checkpoint": {"keep": 1},
        "log": {"tensorboard": False},
    }
