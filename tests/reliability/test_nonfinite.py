"""Numerical faults: a NaN/Inf loss or gradient skips the step (counted and logged), weights
and optimizer state never take a non-finite value, and too many in a row abort clearly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from faults import launch, train_config_dict, write_toml

from familial.train import checkpoint as ckpt
from familial.train import loop
from familial.train.config import load_config
from familial.train.loop import NonFiniteError, Trainer
from familial.train.metrics import read_metrics


def snapshot(trainer: Trainer) -> tuple[dict, dict]:
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    optimizer = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for i, s in trainer.optimizer.state_dict()["state"].items()}
    return weights, optimizer


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else (same(a[k], b[k]) if isinstance(a[k], dict)
                                                                 else a[k] == b[k]) for k in a)


def poison(kind: str, model) -> list:
    """Hooks that make this step's loss or one gradient non-finite; returns their handles."""
    if kind == "nan-activation":  # a poisoned batch: NaN flows from the embeddings into every loss
        return [model.model.embed_tokens.register_forward_hook(lambda m, i, out: out * math.nan)]
    if kind == "inf-gradient":  # the loss stays finite; one trunk weight's gradient overflows
        weight = model.model.layers["0"].mlp.down_proj.weight
        return [weight.register_hook(lambda grad: grad * math.inf)]
    raise ValueError(kind)


def run_with_faults(monkeypatch, trainer: Trainer, kind: str, bad_steps: set[int]):
    """Train, poisoning the steps in `bad_steps` (1-based); record state around every step."""
    real = loop.train_step
    history = []

    def step(layout, *args, **kwargs):
        number = trainer.state.step + 1
        before = snapshot(trainer)
        handles = poison(kind, layout.model) if number in bad_steps else []
        try:
            result = real(layout, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        history.append((number, result, before, snapshot(trainer)))
        return result

    monkeypatch.setattr(loop, "train_step", step)
    return history


@pytest.mark.parametrize("kind", ["nan-activation", "inf-gradient"])
def test_non_finite_steps_are_skipped_counted_logged_and_leave_weights_alone(tmp_path, shards, monkeypatch,
                                                                              kind):
    config = load_config(data=train_config_dict(tmp_path / "run", shards, steps=7, max_bad_steps=3,
                                                checkpoint={"every": 1, "keep": 10}))
    trainer = Trainer(config)
    history = run_with_faults(monkeypatch, trainer, kind, bad_steps={2, 3, 5})
    state = trainer.run()
    assert (state.step, state.skipped, state.bad_in_a_row) == (7, 3, 0)

    for number, result, (weights, optim), (after_weights, after_optim) in history:
        assert result.skipped == (number in {2, 3, 5}), number
        for name, tensor in after_weights.items():
            assert torch.isfinite(tensor).all(), (number, name)
        for index, values in after_optim.items():
            assert all(torch.isfinite(v).all() for v in values.values() if torch.is_tensor(v)), (number, index)
        if result.skipped:  # not even AdamW's moments or step count move
            assert same(weights, after_weights) and same(optim, after_optim), number
        else:
            assert not same(weights, after_weights), number
    records = read_metrics(config.run_dir)
    assert [r["skipped"] for r in records] == [n in {2, 3, 5} for n in range(1, 8)]
    for record in records:
        if record["skipped"]:
            assert record["loss"] is None or record["grad_norm"] is None
    # The count survives a checkpoint, so a resumed run keeps counting where it stopped.
    _, _, saved = ckpt.load_checkpoint(ckpt.list_checkpoints(config.run_dir)[-1])
    assert (saved["skipped"], saved["bad_in_a_row"]) == (3, 0)


def test_too_many_in_a_row_abort_with_the_last_good_checkpoint_intact(tmp_path, shards, monkeypatch, capsys):
    config = load_config(data=train_config_dict(tmp_path / "run", shards, steps=10, max_bad_steps=2,
                                                checkpoint={"every": 1, "keep": 10}))
    trainer = Trainer(config)
    run_with_faults(monkeypatch, trainer, "inf-gradient", bad_steps={2, 4, 5, 6})
    with pytest.raises(NonFiniteError, match=r"2 consecutive non-finite steps \(max_bad_steps = 2\)"):
        trainer.run()
    assert (trainer.state.step, trainer.state.skipped) == (5, 3)
    printed = capsys.readouterr()
    assert "step 4: non-finite loss or gradient, update skipped (1 in a row)" in printed.out + printed.err
    assert "step 5: non-finite loss or gradient, update skipped (2 in a row)" in printed.out + printed.err
    latest = ckpt.list_checkpoints(config.run_dir)[-1]
    model, _, saved = ckpt.load_checkpoint(latest)
    assert saved["step"] <= 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    monkeypatch.undo()
    resumed = Trainer(config, resume="latest")
    assert resumed.run().step == 10 and resumed.state.bad_in_a_row == 0


@pytest.mark.distributed
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path, shards):
    """Two pipeline stages: only stage 1 (rank 1) sees an infinite gradient at step 3, yet both
    ranks skip that update together, and the run's losses are those of one process that
    skipped the same step."""
    launcher = Path(__file__).with_name("poisoned_rank.py")
    spec = {"rank": 1, "steps": [3]}
    data = train_config_dict(tmp_path / "run", shards, steps=5)
    single = write_toml(tmp_path / "single.toml", dict(data, run_dir=str(tmp_path / "single")))
    code, output, _ = launch(launcher, {"rank": 0, "steps": [3]}, single)
    assert code == 0, output[-3000:]
    config = write_toml(tmp_path / "train.toml", dict(data, parallel={"pp": 2, "microbatches": 2}))
    code, output, _ = launch(launcher, spec, config, nproc=2)
    assert code == 0, output[-3000:]
    for rank in (0, 1):
        for step in range(1, 6):
            assert f"rank {rank} step {step}: skipped {step == 3}, weights changed {step != 3}" in output, \
                (rank, step, output[-3000:])
    got, want = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "single")
    assert [r["skipped"] for r in got] == [r["skipped"] for r in want] == [False, False, True, False, False]
    for a, b in zip(got, want):
        for key in ("loss/exit-1", "loss/exit-2", "loss/exit-3"):
            assert abs(a[key] - b[key]) <= 1e-4, (a["step"], key, a[key], b[key])
