"""`familial train CONFIG --parallel.pp 2` under torchrun logs the single-process run's losses."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from familial.checkpoint_io import load_family
from familial.data import write_shards
from familial.train.config import load_config
from familial.train.loop import Trainer
from familial.train.metrics import read_metrics

pytestmark = pytest.mark.distributed

VOCAB = 64


def config_dict(tmp_path, shards, run_dir) -> dict:
    return {
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


def toml_value(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def write_toml(path, data: dict) -> None:
    lines = [f'"{k}" = {toml_value(v)}' for k, v in data.items() if not isinstance(v, dict)]
    for table, items in data.items():
        if isinstance(items, dict):
            lines.append(f"[{table}]")
            lines += [f'"{k}" = {toml_value(v)}' for k, v in items.items()]
    path.write_text("\n".join(lines) + "\n")


def test_parallel_launch_logs_the_single_process_losses(tmp_path):
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, VOCAB) + np.arange(rng.integers(8, 30))) % VOCAB for _ in range(40)]
    shards = tmp_path / "shards"
    write_shards(shards, docs, vocab_size=VOCAB, eos_token_id=0)

    single = config_dict(tmp_path, shards, tmp_path / "single")
    Trainer(load_config(data=single)).run()

    config = tmp_path / "parallel.toml"
    write_toml(config, config_dict(tmp_path, shards, tmp_path / "parallel"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "familial.cli", "train", str(config), "--parallel.pp", "2", "--parallel.microbatches", "2"]
    process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"torchrun familial train hung:\n{process.communicate()[0][-3000:]}")
    assert process.returncode == 0, output[-5000:]
    assert "stages [0, 2, 4]" in output or "stages [0, 3, 4]" in output or "stages [0, 1, 4]" in output

    want, got = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "parallel")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for a, b in zip(want, got):
        for key in ("loss/exit-1", "loss/exit-2", "loss/exit-3", "lr", "loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert (tmp_path / "parallel" / "checkpoints" / "dcp-00000002" / ".metadata").is_file()
    family = load_family(tmp_path / "parallel" / "family")
    assert family.config.exits == [1, 2, 3]
