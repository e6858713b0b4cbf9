"""Resume anywhere, through the CLI: one process -> tp2 x pp2 on 4 processes -> one process, each
phase extending the run with a larger --steps, continues the single-process loss curve."""

import pytest
from launch import config_dict, familial, write_shards_for, write_toml
from test_train_cli import assert_same_curve

from familial.cli import main
from familial.train import checkpoint as ckpt
from familial.train.config import load_config
from familial.train.loop import Trainer
from familial.train.metrics import read_metrics

pytestmark = pytest.mark.distributed

# A schedule that does not depend on the run's length, so extending it changes nothing before.
CONSTANT_LR = {"lr": 3e-3, "warmup_steps": 1, "kind": "constant"}


def test_one_process_to_tp2_pp2_to_one_process_with_extensions(tmp_path, capsys):
    shards = write_shards_for(tmp_path / "shards")
    reference = config_dict(shards, tmp_path / "reference", steps=6, lr=CONSTANT_LR)
    Trainer(load_config(data=reference)).run()

    run = tmp_path / "run"
    config = write_toml(tmp_path / "train.toml", config_dict(shards, run, steps=2, lr=CONSTANT_LR,
                                                              checkpoint={"every": 0, "keep": 3}))
    assert main(["train", str(config)]) == 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
    # A finished run resumed as it is says so, and trains nothing.
    assert main(["train", str(config), "--resume"]) == 0
    assert "2 of 2 steps already trained; nothing to do (pass --steps N" in capsys.readouterr().out

    output = familial(["train", str(config), "--resume", "--steps", "4", "--parallel.tp", "2", "--parallel.pp", "2",
                       "--parallel.microbatches", "2"], nproc=4)
    assert "pp=2 dp_replicate=1 dp_shard=1 tp=2 on 4 ranks" in output
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002", "dcp-00000004"]

    assert main(["train", str(config), "--resume", "--steps", "6"]) == 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002", "dcp-00000004", "step-00000006"]
    assert_same_curve(read_metrics(run), read_metrics(tmp_path / "reference"),
                      ("loss/exit-1", "loss/exit-2", "loss/exit-3", "loss", "lr"), 1e-4)
