"""`familial train` launched as a user would: TOML configs, torchrun with N CPU processes, one process."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from familial.data import write_shards

VOCAB = 64
TIMEOUT_S = 240


def write_shards_for(path, documents: int = 40):
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, VOCAB) + np.arange(rng.integers(8, 30))) % VOCAB for _ in range(documents)]
    write_shards(path, docs, vocab_size=VOCAB, eos_token_id=0)
    return path


def config_dict(shards, run_dir, **top) -> dict:
    config = {
        "run_dir": str(run_dir), "steps": 4, "seed": 3,
        "init": {"model": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "exits": [1, 2, 3], "max_position_embeddings": 64}},
        "data": {"sources": [{"path": str(shards)}], "seq_len": 16, "batch_size": 2, "grad_accum": 2},
        "lr": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
        "loss": {"lambdas": {"1": 0.5, "2": 0.25}},
        "checkpoint": {"every": 2},
        "log": {"progress": False, "tensorboard": False},
    }
    config.update(top)
    return config


def toml_value(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def write_toml(path, data: dict):
    lines = [f'"{k}" = {toml_value(v)}' for k, v in data.items() if not isinstance(v, dict)]
    for table, items in data.items():
        if isinstance(items, dict):
            lines.append(f"[{table}]")
            lines += [f'"{k}" = {toml_value(v)}' for k, v in items.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def familial(args: list[str], nproc: int = 1) -> str:
    """Run `familial ARGS` (under torchrun when nproc > 1); returns its output, failing the test on error."""
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "familial.cli", *args]
    else:
        command = [sys.executable, "-m", "familial.cli", *args]
    process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"familial {' '.join(args)} hung:\n{process.communicate()[0][-3000:]}")
    assert process.returncode == 0, output[-5000:]
    return output
