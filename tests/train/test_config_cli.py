"""Train config loading, overrides and errors; the `familial train` and `familial plot` commands."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from familial.cli import main
from familial.config import ConfigError
from familial.train.config import load_config


def write_toml(path, shards, run_dir, extra=""):
    path.write_text(f"""
run_dir = "{run_dir}"
steps = 3
seed = 1

[init.model]
vocab_size = 53
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 3
num_attention_heads = 4
num_key_value_heads = 2
exits = [0, 2]

[data]
seq_len = 16
batch_size = 2
sources = [{{ path = "{shards}" }}]

[loss.lambdas]
0 = {{ kind = "warm_decay", start = 1.0, end = 0.1, start_step = 1, end_step = 3 }}

[log]
progress = false
tensorboard = false
{extra}
""")
    return path


def test_overrides_are_typed_from_the_dataclass(tmp_path, shards):
    path = write_toml(tmp_path / "c.toml", shards, tmp_path / "run")
    config = load_config(path, ["--lr.lr", "1e-3", "--steps=7", "--run_dir", "123",
                                "--loss.lambdas.2", "0.25", "--optim.grad_clip", "0",
                                "--activation_checkpointing", "selective"])
    assert config.lr.lr == 1e-3 and config.steps == 7 and config.run_dir == "123"
    assert config.loss.lambdas["2"] == 0.25 and config.loss.lambdas["0"].kind == "warm_decay"
    assert config.optim.grad_clip == 0.0 and config.activation_checkpointing == "selective"


def test_overrides_reach_list_entries(tmp_path, shards):
    stages = '[[stages]]\nsteps = 2\nname = "general"\n[[stages]]\nsteps = 3\nname = "domain"\n'
    path = write_toml(tmp_path / "c.toml", shards, tmp_path / "run", extra=stages)
    config = load_config(path, ["--steps", "0", "--stages.1.steps", "5", "--stages.0.lr.lr", "2e-3"])
    assert [s.steps for s in config.stages] == [2, 5]
    assert config.stages[0].lr.lr == 2e-3
    with pytest.raises(ConfigError, match="no list entry '2'"):
        load_config(path, ["--stages.2.steps", "5"])


@pytest.mark.parametrize("overrides, message", [
    (["--lr.lr", "fast"], r"field 'lr'.*'fast'.*expected a finite number"),
    (["--optim.betas", "1"], r"override --optim.betas: unknown field 'betas'"),
    (["--data.batch_size", "0"], r"field 'data.batch_size' = 0"),
    (["--parallel.tp", "2"], r"field 'parallel.tp' = 2"),
    (["--lr.min_lr", "1.0"], r"field 'lr.min_lr' = 1.0"),
    (["--init.model.exits", "[0, 1]"], r"exits"),
    (["--precision", "fp8"], r"field 'precision'.*'fp8'.*expected one of"),
    (["--activation_checkpointing", "true"], r"field 'activation_checkpointing'.*expected one of 'none', 'full'"),
    (["--device", "tpu"], r"field 'device' = 'tpu': expected auto, cpu, cuda or cuda:N"),
    (["--lr.lr"], r"missing a value"),
])
def test_config_errors_name_the_field(tmp_path, shards, overrides, message):
    path = write_toml(tmp_path / "c.toml", shards, tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_bad_files_name_the_file(tmp_path, shards):
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("steps = = 3\n")
    with pytest.raises(ConfigError, match="broken.toml: invalid TOML"):
        load_config(broken)
    path = write_toml(tmp_path / "c.toml", shards, tmp_path / "run", extra="[[stages]]\nsteps = 2\n")
    with pytest.raises(ConfigError, match="field 'steps' = 3: with \\[\\[stages\\]\\]"):
        load_config(path)


def test_train_resume_and_plot_commands(tmp_path, shards, capsys):
    path = write_toml(tmp_path / "c.toml", shards, tmp_path / "run")
    assert main(["train", str(path), "--steps", "4", "--checkpoint.every", "2"]) == 0
    # As if the run had died between its step-2 and step-4 checkpoints.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000004")
    assert main(["train", str(path), "--resume", "--steps", "4", "--checkpoint.every", "2"]) == 0
    out = capsys.readouterr().out
    # The run names the thread count it picked, and its last line is the family's path.
    assert "threads: 1 (a small model" in out and "done: 4 steps" in out
    family = tmp_path / "run" / "family"
    assert out.strip().splitlines()[-1] == str(family)
    assert family.resolve() == (tmp_path / "run" / "checkpoints" / "step-00000004" / "family").resolve()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert main(["plot", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["train", str(path), "--lr.lr", "x"]) == 2
    assert "field 'lr'" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    (["--loss.lambdas.9", "0.5"], r"field 'loss.lambdas' key '9'"),
    (["--loss.distill.tiny", "0.5"], r"field 'loss.distill' key 'tiny'"),
    (["--stages.0.freeze", '["branches.7.*"]'], r"field 'freeze' pattern 'branches.7.\*' matches no parameter"),
])
def test_a_refused_run_writes_nothing(tmp_path, shards, capsys, override, message):
    stages = "[[stages]]\nsteps = 2\n" if override[0].startswith("--stages") else ""
    path = write_toml(tmp_path / "c.toml", shards, tmp_path / "run", extra=stages)
    override = ["--steps", "0", *override] if stages else override
    assert main(["train", str(path), *override]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_progress_shows_the_mean_exit_loss_with_its_meaning(tmp_path, shards, capsys):
    path = write_toml(tmp_path / "c.toml", shards, tmp_path / "run")
    assert main(["train", str(path), "--log.progress", "true", "--steps", "2"]) == 0
    progress = capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    mean = (record["loss/exit-0"] + record["loss/exit-2"]) / 2
    assert f"mean CE of 2 exits {mean:.3f}" in progress
    assert f"full member {record['loss/exit-2']:.3f} (nats/token)" in progress
