"""A rank of a 2-process gloo training run dies: the run stops with an error naming the
rank within a bounded time (no hang), and `--resume` continues from the last checkpoint to
the same losses as an uninterrupted run."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from faults import launch, train_config_dict, write_toml
from familial.parallel.mesh import store_of_this_start
from familial.train.config import load_config
from familial.train.loop import Trainer
from familial.train.metrics import read_metrics

pytestmark = pytest.mark.distributed

LAUNCHER = Path(__file__).with_name("dying_rank.py")
STEPS = 6


def torchrun(config: Path, spec: dict, resume: bool = False, restarts: int = 0) -> tuple[int, str, float]:
    return launch(LAUNCHER, spec, config, *(["--resume"] if resume else []), nproc=2, restarts=restarts)


def assert_resumed_on_the_uninterrupted_curve(tmp_path: Path, output: str) -> None:
    """Both ranks resumed from the step-2 checkpoint and the run logged what one process did."""
    for rank in (0, 1):
        assert f"rank {rank} resumed from {tmp_path / 'run' / 'checkpoints' / 'dcp-00000002'}" in output
    got, want = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "single")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        for key in ("loss/exit-1", "loss/exit-2", "loss/exit-3", "lr"):
            assert abs(a[key] - b[key]) <= 1e-4, (a["step"], key, a[key], b[key])


def test_a_dead_rank_stops_the_run_and_resume_continues_from_the_last_checkpoint(tmp_path, shards):
    data = train_config_dict(tmp_path / "run", shards, steps=STEPS, checkpoint={"every": 2, "keep": 2})
    Trainer(load_config(data=dict(data, run_dir=str(tmp_path / "single")))).run()
    # Two pipeline stages: every step both ranks exchange activations and gradients.
    config = write_toml(tmp_path / "train.toml", dict(data, parallel={"pp": 2, "microbatches": 2}))

    code, output, seconds = torchrun(config, {"rank": 1, "step": 4})
    assert code != 0, output[-3000:]
    # torchrun's report names the rank that died and how.
    assert "rank      : 1" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    logged = read_metrics(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 2, 3]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("dcp-*"))
    assert checkpoints == ["dcp-00000002"]

    code, output, resumed_seconds = torchrun(config, {}, resume=True)
    assert code == 0, output[-3000:]
    assert_resumed_on_the_uninterrupted_curve(tmp_path, output)
    print(f"rank failure: stopped in {seconds:.1f}s (launch included), resumed run {resumed_seconds:.1f}s")


def test_torchrun_restarts_a_run_whose_rank_died_and_it_finishes_on_the_uninterrupted_curve(tmp_path, shards):
    # One command line for the first start and the restart: `--resume` on an empty run
    # directory starts from step 0; torchrun restarts every rank after rank 1 dies at step 4,
    # and the restart resumes from the step-2 checkpoint.
    data = train_config_dict(tmp_path / "run", shards, steps=STEPS, checkpoint={"every": 2, "keep": 2})
    Trainer(load_config(data=dict(data, run_dir=str(tmp_path / "single")))).run()
    # FSDP over two ranks, each with half of the single process's rows: the same global batch.
    config = write_toml(tmp_path / "train.toml", dict(data, parallel={"dp_shard": 2},
                                                      data=dict(data["data"], batch_size=1)))

    code, output, _ = torchrun(config, {"rank": 1, "step": 4, "attempt": 0}, resume=True, restarts=1)
    assert code == 0, output[-3000:]
    assert "no checkpoint yet; --resume starts from step 0" in output
    assert_resumed_on_the_uninterrupted_curve(tmp_path, output)


def test_a_restarted_rank_does_not_read_what_the_start_before_published(monkeypatch):
    # torchrun's agent keeps one store across restarts: the address a rank published in the
    # first start (it died since) must not be what a rank of the second start connects to.
    agent_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent_store.port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    store_of_this_start(timedelta(seconds=10)).set("rank_1", "address of the first start")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = store_of_this_start(timedelta(seconds=10))
    assert not restarted.check(["rank_1"])
    restarted.set("rank_1", "address of the second start")
    assert restarted.get("rank_1") == b"address of the second start"
