"""kill -9 during training, at seeded random points: resume always continues from the last
complete checkpoint, the loss trajectory equals an uninterrupted run's exactly, and no
checkpoint on disk loads with wrong contents."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from faults import leftovers, train_config_dict, write_toml

from familial.checkpoint_io import CheckpointError
from familial.train import checkpoint as ckpt
from familial.train.config import load_config
from familial.train.loop import Trainer
from familial.train.metrics import read_metrics

INJECTOR = Path(__file__).with_name("crashing_train.py")
# Where a process can die: in a step, in each file of a checkpoint, between a checkpoint's
# rename and the pruning of older ones, half-way through pruning, inside a metrics line;
# "external" is a plain SIGKILL from outside at a random moment.
POINTS = ["step", "weights", "optimizer", "manifest", "rename", "prune", "metrics", "external"]
# Each trial dies at or before its `at`-th (<= 2nd) checkpoint, so a run this long is still
# running when every trial's kill point comes, whatever the machine's speed.
STEPS = 2 * len(POINTS) + 1
# Points after which the checkpoint being written is already complete (renamed into place).
AFTER_RENAME = {"rename", "prune"}


class Injector:
    """The fork server of crashing_train.py: one `familial train` child per trial."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.count, self.running = logs, 0, None
        self.server = subprocess.Popen([sys.executable, str(INJECTOR)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)

    def start(self, config: Path, point: str, at: int, resume: bool) -> tuple[int, Path]:
        self.count += 1
        log = self.logs / f"trial-{self.count}"
        job = {"point": point, "at": at, "log": str(log),
               "argv": [str(config), *(["--resume"] if resume else [])]}
        self.server.stdin.write(json.dumps(job) + "\n")
        self.server.stdin.flush()
        self.running = int(self.server.stdout.readline().split()[1])
        return self.running, log

    def wait(self) -> int:
        code = int(self.server.stdout.readline().split()[1])
        self.running = None
        return code

    def close(self) -> None:
        # A trial that failed before its kill leaves a child holding forever: end it.
        if self.running is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.running, signal.SIGKILL)
        self.server.stdin.close()
        self.server.wait(timeout=60)


def start_line(log: Path, seconds: float = 120) -> str:
    """The trainer's `start step N` line (after the lines it prints before training starts)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = Path(f"{log}.out").read_text() if Path(f"{log}.out").exists() else ""
        for line in text.splitlines(keepends=True):
            if line.startswith("start step") and line.endswith("\n"):
                return line.strip()
        time.sleep(0.02)
    raise AssertionError(f"no start line from the trainer in {seconds}s: {Path(f'{log}.err').read_text()[-3000:]}")


def logged(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run_dir)]


def state_of(directory: Path) -> tuple[dict, dict, dict]:
    model, optimizer, trainer = ckpt.load_checkpoint(directory)
    return model.state_dict(), optimizer["state"], trainer


def assert_same_checkpoint(got: Path, want: Path) -> None:
    (weights, optim, trainer), (ref_weights, ref_optim, ref_trainer) = state_of(got), state_of(want)
    assert trainer == ref_trainer, got
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), (got, name)
    for index in ref_optim:
        for key, value in ref_optim[index].items():
            assert torch.equal(optim[index][key], value), (got, index, key)


def crash_config(run_dir: Path, shards: Path, keep: int) -> dict:
    config = train_config_dict(run_dir, shards, steps=STEPS, checkpoint={"every": 1, "keep": keep})
    config["data"]["grad_accum"] = 1
    return config


def test_kill_9_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path, shards):
    rng = random.Random(20261129)
    reference_config = load_config(data=crash_config(tmp_path / "reference", shards, keep=STEPS))
    Trainer(reference_config).run()
    reference = {int(p.name[len(ckpt.PREFIX):]): p for p in ckpt.list_checkpoints(reference_config.run_dir)}

    run_dir = tmp_path / "run"
    config = write_toml(tmp_path / "train.toml", crash_config(run_dir, shards, keep=2))
    trials = list(POINTS)
    rng.shuffle(trials)
    kills = []
    injector = Injector(tmp_path)
    try:
        for point in trials:
            found = ckpt.list_checkpoints(run_dir)
            latest = int(found[-1].name[len(ckpt.PREFIX):]) if found else 0
            at = rng.randint(1, 2)
            pid, log = injector.start(config, point, at, resume=bool(found))
            assert start_line(log) == f"start step {latest}", point
            if point == "external":
                # Lands anywhere in the next `at` steps and saves, or where the child holds.
                time.sleep(rng.uniform(0.0, 0.5))
                os.kill(pid, signal.SIGKILL)
            code = injector.wait()
            if code == 0:
                continue  # finished before this kill point; the next trial still resumes
            assert code == -9, (point, Path(f"{log}.err").read_text()[-3000:])
            saved = [int(line.split()[-1]) for line in Path(f"{log}.out").read_text().splitlines()
                     if line.startswith("saved step")]
            last_saved = saved[-1] if saved else latest
            kills.append((point, at))
            check_after_kill(run_dir, point, last_saved, reference)
        pid, log = injector.start(config, "none", 1, resume=True)
        assert injector.wait() == 0, Path(f"{log}.err").read_text()[-3000:]
    finally:
        injector.close()

    assert len(kills) == len(POINTS), kills
    assert logged(run_dir) == logged(reference_config.run_dir)
    assert [r["step"] for r in logged(run_dir)] == list(range(1, STEPS + 1))
    final = ckpt.list_checkpoints(run_dir)[-1]
    assert final.name == f"{ckpt.PREFIX}{STEPS:08d}"
    assert_same_checkpoint(final, reference[STEPS])
    assert leftovers(ckpt.checkpoint_root(run_dir)) == []
    print(f"kill -9 trials: {len(kills)} ({', '.join(f'{p}@{a}' for p, a in kills)})")


def check_after_kill(run_dir: Path, point: str, last_saved: int, reference: dict[int, Path]) -> None:
    """The newest checkpoint is the last one renamed into place, and it is complete; every
    checkpoint either refuses to load (a half-pruned old one) or equals the reference's."""
    found = ckpt.list_checkpoints(run_dir)
    newest = int(found[-1].name[len(ckpt.PREFIX):])
    if point in AFTER_RENAME:
        assert newest == last_saved + 1, (point, newest, last_saved)
    elif point != "external":
        assert newest == last_saved, (point, newest, last_saved)
    assert newest in (last_saved, last_saved + 1)
    for directory in found:
        try:
            ckpt.verify(directory)
        except CheckpointError:
            assert directory != found[-1], (point, "the newest checkpoint must be complete")
            continue
        assert_same_checkpoint(directory, reference[int(directory.name[len(ckpt.PREFIX):])])
