"""`familial train` under torchrun, as a user runs it: the single-process run's losses, any layout."""

import json
import os

import pytest
from launch import config_dict, familial, write_shards_for, write_toml

from familial.checkpoint_io import load_family
from familial.train.config import load_config
from familial.train.loop import Trainer
from familial.train.metrics import read_metrics

pytestmark = pytest.mark.distributed


def assert_same_curve(got: list[dict], want: list[dict], keys, tolerance: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got):
        for key in keys:
            assert abs(a[key] - b[key]) <= tolerance * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])


def test_parallel_launch_logs_the_single_process_losses(tmp_path):
    shards = write_shards_for(tmp_path / "shards")
    single = config_dict(shards, tmp_path / "single")
    Trainer(load_config(data=single)).run()

    # Async distributed saves, keeping one: only the newest checkpoint survives, and the
    # run's last line is RUN_DIR/family, exported from it once the process group has ended.
    config = write_toml(tmp_path / "parallel.toml", config_dict(
        shards, tmp_path / "parallel", checkpoint={"every": 1, "keep": 1, "async_save": True}))
    output = familial(["train", str(config), "--parallel.pp", "2", "--parallel.microbatches", "2"], nproc=2)
    assert "stages [0, 2, 4]" in output or "stages [0, 3, 4]" in output or "stages [0, 1, 4]" in output
    run = tmp_path / "parallel"
    assert output.strip().splitlines()[-1] == str(run / "family")

    assert_same_curve(read_metrics(run), read_metrics(tmp_path / "single"),
                      ("loss/exit-1", "loss/exit-2", "loss/exit-3", "lr", "loss"), 1e-5)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["dcp-00000004"]
    assert os.readlink(run / "family") == os.path.join("checkpoints", "dcp-00000004", "family")
    family = load_family(run / "family")
    assert family.config.exits == [1, 2, 3]
    assert json.loads((run / "checkpoints" / "dcp-00000004" / "trainer.json").read_text())["layout"]["pp"] == 2
