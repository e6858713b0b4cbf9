"""The trainer: exact resume, atomic checkpoints, stages and freezing, non-finite steps."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from familial.checkpoint_io import export_all, load_family
from familial.config import ConfigError
from familial.train import checkpoint as ckpt
from familial.train import loop
from familial.train.config import load_config
from familial.train.loop import NonFiniteError, Trainer, build_batches
from familial.train.metrics import read_metrics


def state_of(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_twenty_steps_equal_ten_plus_resume_plus_ten_bit_for_bit(tmp_path, shards, make_config):
    straight = Trainer(load_config(data=make_config(tmp_path / "a", shards, steps=20)))
    straight.run()

    config = load_config(data=make_config(tmp_path / "b", shards, steps=20))
    first = Trainer(config)
    assert first.run(max_steps=10).step == 10
    del first
    torch.manual_seed(1234)  # whatever happens in between must not matter
    resumed = Trainer(config, resume="latest")
    assert resumed.state.step == 10
    resumed.run()

    a, b = state_of(straight), state_of(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    def logged(run):  # every logged number but the (timing-dependent) throughput
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run)]

    assert logged(tmp_path / "a" / "run") == logged(tmp_path / "b" / "run")
    assert len(logged(tmp_path / "b" / "run")) == 20
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for index in opt_a:
        for key in opt_a[index]:
            assert torch.equal(opt_a[index][key], opt_b[index][key])


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path, shards, make_config, monkeypatch):
    config = load_config(data=make_config(tmp_path, shards, steps=4,
                                               checkpoint={"every": 2, "keep": 2}))
    trainer = Trainer(config)
    trainer.run(max_steps=2)
    good = ckpt.list_checkpoints(config.run_dir)
    assert [p.name for p in good] == ["step-00000002"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(max_steps=4)
    monkeypatch.undo()
    assert ckpt.list_checkpoints(config.run_dir) == good
    # Nothing half-written is visible, and the survivor verifies and resumes.
    assert sorted(p.name for p in ckpt.checkpoint_root(config.run_dir).iterdir()) == ["step-00000002"]
    resumed = Trainer(config, resume="latest")
    assert resumed.state.step == 2
    assert resumed.run().step == 4


def test_corrupt_checkpoint_is_refused_by_its_checksum(tmp_path, shards, make_config):
    config = load_config(data=make_config(tmp_path, shards, steps=2))
    Trainer(config).run()
    latest = ckpt.list_checkpoints(config.run_dir)[-1]
    trainer_json = latest / "trainer.json"
    trainer_json.write_text(trainer_json.read_text().replace('"step": 2', '"step": 3'))
    with pytest.raises(ValueError, match="trainer.json: checksum mismatch"):
        Trainer(config, resume=str(latest))


def test_a_fresh_run_refuses_a_run_dir_with_checkpoints(tmp_path, shards, make_config):
    config = load_config(data=make_config(tmp_path, shards, steps=2))
    Trainer(config).run()
    before = sorted(p.name for p in ckpt.list_checkpoints(config.run_dir))
    with pytest.raises(ConfigError, match="already holds checkpoints.*pass --resume"):
        Trainer(config)
    assert sorted(p.name for p in ckpt.list_checkpoints(config.run_dir)) == before


def test_checkpoint_family_is_exportable_and_run_dir_keeps_resolved_config(tmp_path, shards, make_config):
    config = load_config(data=make_config(tmp_path, shards, steps=3))
    trainer = Trainer(config)
    trainer.run()
    family = trainer.final_family()
    members = export_all(family, tmp_path / "export")
    assert [p.name for p in members] == ["exit-1", "exit-2", "exit-3"]
    resolved = json.loads((tmp_path / "run" / "config.resolved.json").read_text())
    assert resolved["loss"]["chunk_size"] == 13 and resolved["optim"]["grad_clip"] == 1.0
    assert load_config(data=resolved) == config
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss/exit-1", "loss/exit-2", "loss/exit-3", "lambda/exit-1", "kd/exit-2",
                "mu/exit-2", "lr", "grad_norm", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert records[0]["lambda/exit-1"] == 0.5 and records[0]["lambda/exit-3"] == 1.0
    assert records[0]["lr"] == pytest.approx(1.5e-3)  # warmup step 1 of 2


def test_stages_run_in_sequence_and_frozen_trunk_does_not_move(tmp_path, shards, make_config):
    data = make_config(tmp_path, shards, steps=0)
    data.pop("steps")
    data["stages"] = [{"name": "cpt", "steps": 3},
                      {"name": "sft", "steps": 2, "freeze": ["model.*", "lm_head.weight"],
                       "lr": {"lr": 1e-2, "kind": "constant"}}]
    config = load_config(data=data)
    trainer = Trainer(config)
    trainer.run(max_steps=3)
    before = state_of(trainer)
    trainer.run()
    after = state_of(trainer)
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == (name.startswith("branches.")), name
    records = read_metrics(config.run_dir)
    assert [r["stage"] for r in records] == ["cpt"] * 3 + ["sft"] * 2
    assert [r["lr"] for r in records[3:]] == [1e-2, 1e-2]
    assert [p.name for p in ckpt.list_checkpoints(config.run_dir)] == ["step-00000003", "step-00000005"]


def test_non_finite_steps_are_skipped_then_abort(tmp_path, shards, make_config, monkeypatch):
    config = load_config(data=make_config(tmp_path, shards, steps=5, max_bad_steps=3))
    trainer = Trainer(config)
    before = state_of(trainer)

    def poisoned(loss, family_config, step):
        return {e: math.nan for e in family_config.exits}, {}

    monkeypatch.setattr(loop, "exit_weights", poisoned)
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        trainer.run()
    for name, value in state_of(trainer).items():
        assert torch.equal(value, before[name]), name
    records = read_metrics(config.run_dir)
    assert [r["skipped"] for r in records] == [True] * 3
    assert records[0]["loss"] is None


def first_step(tmp_path, shards, make_config, **top):
    """Per-exit losses and every gradient of the first step of a fresh run."""
    config = load_config(data=make_config(tmp_path, shards, **top))
    trainer = Trainer(config)
    stage = trainer.stages[0]
    batches = build_batches(stage.data, config.seed)
    lambdas, distill = loop.exit_weights(stage.loss, trainer.family_config, 0)
    sums = trainer.layout.forward_backward([next(batches) for _ in range(stage.data.grad_accum)], lambdas,
                                           distill, stage.loss.chunk_size)
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return sums, grads


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(tmp_path, shards, make_config, mode):
    plain, plain_grads = first_step(tmp_path / "none", shards, make_config)
    recomputed, grads = first_step(tmp_path / mode, shards, make_config, activation_checkpointing=mode)
    assert recomputed.per_exit.ce == pytest.approx(plain.per_exit.ce, abs=1e-6)
    assert recomputed.per_exit.kd == pytest.approx(plain.per_exit.kd, abs=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=0, msg=name)


def test_bf16_autocast_trains_and_checkpoints_stay_float32(tmp_path, shards, make_config):
    config = load_config(data=make_config(tmp_path, shards, steps=3, precision="bf16"))
    trainer = Trainer(config)
    trainer.run()
    records = read_metrics(config.run_dir)
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in records)
    assert load_family(trainer.final_family()).lm_head.weight.dtype == torch.float32


def test_compiled_blocks_match_eager(tmp_path, shards, make_config):
    plain, plain_grads = first_step(tmp_path / "eager", shards, make_config)
    compiled, grads = first_step(tmp_path / "compiled", shards, make_config, compile=True,
                                 activation_checkpointing="selective")
    assert compiled.per_exit.ce == pytest.approx(plain.per_exit.ce, rel=1e-5)
    assert compiled.per_exit.kd == pytest.approx(plain.per_exit.kd, rel=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_device_and_precision_follow_the_machine(monkeypatch):
    from familial.train.layout import compute_dtype, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3) == resolve_device("cuda")
    assert compute_dtype("auto", torch.device("cuda", 3)) == torch.bfloat16
    assert compute_dtype("fp32", torch.device("cuda", 3)) == torch.float32


def test_thread_count_never_oversubscribes_a_busy_machine(monkeypatch):
    from familial import threads

    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_cores", lambda: 6.2)
    assert threads.pick_threads(2048, 24) == (2, "8 core(s), other processes busy on 6.2")
    monkeypatch.setattr(threads, "busy_cores", lambda: 30.0)
    assert threads.pick_threads(2048, 24)[0] == 1
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.1)
    assert threads.pick_threads(2048, 24)[0] == 8
    assert threads.pick_threads(128, 8)[0] == 1  # a small model: its ops are too small to split
    # Without /proc/stat, the load average stands in.
    monkeypatch.setattr(threads, "busy_cores", lambda: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (6.2, 0.0, 0.0))
    assert threads.pick_threads(2048, 24) == (2, "8 core(s), load average 6.2")


def test_busy_cores_measures_this_machine():
    from familial import threads

    busy = threads.busy_cores(0.05)
    assert busy is None or 0 <= busy <= os.cpu_count()


def test_resume_before_any_checkpoint_starts_from_step_zero(tmp_path, shards, make_config, capsys):
    # One command line for the first start and every restart: nothing saved yet is step 0.
    config = load_config(data=make_config(tmp_path / "run", shards, steps=2))
    trainer = Trainer(config, resume="latest")
    assert trainer.state.step == 0
    assert "no checkpoint yet; --resume starts from step 0" in capsys.readouterr().out
    assert trainer.run().step == 2


class _TwoDataParallelRanks(loop.LocalLayout):
    """One process that reports two data-parallel ranks (what a resume under FSDP sees)."""
    dp_size = 2


def test_resume_under_more_data_parallel_ranks_keeps_the_global_batch_or_refuses(tmp_path, shards, make_config,
                                                                                capsys):
    data = make_config(tmp_path, shards, steps=4)
    data["data"] = dict(data["data"], batch_size=2, grad_accum=2)
    Trainer(load_config(data=data)).run(max_steps=2)
    resumed = Trainer(load_config(data=data), resume="latest", layout=_TwoDataParallelRanks)
    assert resumed.stages[0].data.grad_accum == 1  # 2 rows x 1 x 2 ranks: the saved 4 rows
    assert "grad_accum 2 -> 1 keeps the global batch of 4 rows" in capsys.readouterr().out
    odd = dict(data, data=dict(data["data"], batch_size=3))
    with pytest.raises(ConfigError, match=r"trained on 4 rows per step \(1 data-parallel ranks\).*a step is 12 rows"):
        Trainer(load_config(data=odd), resume="latest", layout=_TwoDataParallelRanks)
