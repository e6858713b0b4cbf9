"""Bad input: every case fails with an error naming the file, field or value at fault, and
leaves nothing half-written or corrupted behind."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from faults import (VOCAB, disk_full_open, leftovers, tiny_family, train_config_dict, write_counting_shards,
                    write_toml)
from familial import cli
from familial.checkpoint_io import (CheckpointError, export_member, import_checkpoint, load_family,
                                    save_family)
from familial.config import ConfigError
from familial.data import ShardError, write_shards
from familial.infer.engine import Engine
from familial.infer.sampling import SamplingParams
from familial.train import checkpoint as ckpt
from familial.train.config import load_config
from familial.train.loop import Trainer

ASSETS = Path(str(resources.files("familial.data").joinpath("assets")))


def damaged(data: bytes, how: str) -> bytes:
    header = int.from_bytes(data[:8], "little")
    if how == "empty":
        return b""
    if how == "cut-in-header":
        return data[:8 + header // 2]
    if how == "cut-in-tensors":
        return data[:8 + header + (len(data) - 8 - header) // 2]
    if how == "one-byte-short":
        return data[:-1]
    if how == "header-length-garbage":
        return (2**40).to_bytes(8, "little") + data[8:]
    if how == "header-not-utf8":
        return data[:9] + b"\xff\xfe" + data[11:]
    raise ValueError(how)


DAMAGE = ["empty", "cut-in-header", "cut-in-tensors", "one-byte-short", "header-length-garbage",
          "header-not-utf8"]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory) -> Path:
    return save_family(tiny_family(), tmp_path_factory.mktemp("family") / "family")


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_family_weights_are_named_and_export_writes_nothing(family_dir, tmp_path, how):
    broken = tmp_path / "broken"
    shutil.copytree(family_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(damaged(weights.read_bytes(), how))
    with pytest.raises(CheckpointError, match=str(weights)):
        load_family(broken)
    with pytest.raises(CheckpointError, match=str(weights)):
        export_member(broken, tmp_path / "member", 1)
    assert not (tmp_path / "member").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["cut-in-tensors", "header-not-utf8"])
def test_damaged_import_source_is_named_and_nothing_is_written(family_dir, tmp_path, how):
    dense = export_member(family_dir, tmp_path / "dense", 3)  # a stock HF Qwen3 checkpoint
    weights = dense / "model.safetensors"
    weights.write_bytes(damaged(weights.read_bytes(), how))
    with pytest.raises(CheckpointError, match=str(weights)):
        import_checkpoint(dense, tmp_path / "imported", exits=[1, 3])
    assert not (tmp_path / "imported").exists() and leftovers(tmp_path) == []


def test_missing_or_truncated_shard_of_a_sharded_checkpoint(tmp_path):
    model = tiny_family()
    sharded = save_family(model, tmp_path / "sharded", max_shard_bytes=60_000)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for name, tensor in load_family(sharded).state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name

    truncated = shards[1]
    original = truncated.read_bytes()
    truncated.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match=truncated.name):
        load_family(sharded)
    truncated.write_bytes(original)

    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shards[-1].name}' is listed but missing"):
        load_family(sharded)
    with pytest.raises(CheckpointError, match=shards[-1].name):
        export_member(sharded, tmp_path / "member", 1)
    assert not (tmp_path / "member").exists() and leftovers(tmp_path) == []


def test_shards_tokenised_for_a_larger_vocabulary_are_refused_before_training(tmp_path):
    big = write_counting_shards(tmp_path / "big", vocab=VOCAB * 4)
    config = load_config(data=train_config_dict(tmp_path / "run", big))
    with pytest.raises(ConfigError, match=rf"manifest.json: vocab_size {VOCAB * 4} is larger than "
                                          rf"the model's vocab_size {VOCAB}"):
        Trainer(config)
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_the_family_vocabulary_is_refused_at_load(tmp_path):
    family = save_family(tiny_family(), tmp_path / "family", tokenizer_source=ASSETS)
    with pytest.raises(ConfigError, match=r"tokenizer.json: 2048 tokens, but .*family.json has vocab_size 61"):
        Engine.from_checkpoint(family)
    (family / "tokenizer.json").write_text((family / "tokenizer.json").read_text()[:300])
    with pytest.raises(ConfigError, match=r"tokenizer.json: not a readable tokenizer"):
        Engine.from_checkpoint(family)


def test_empty_data_leaves_no_shard_directory(tmp_path):
    with pytest.raises(ShardError, match="no documents"):
        write_shards(tmp_path / "empty", [], vocab_size=VOCAB)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["tokens-truncated", "index-truncated", "index-missing",
                                    "manifest-empty-counts"])
def test_damaged_shards_are_named_before_training_writes_anything(tmp_path, shards, damage):
    if damage == "tokens-truncated":
        file, match = shards / "tokens.bin", "tokens.bin: .* bytes, expected"
        file.write_bytes(file.read_bytes()[:-7])
    elif damage == "index-truncated":
        file, match = shards / "documents.npy", "documents.npy: not a readable .npy array"
        file.write_bytes(file.read_bytes()[:-5])
    elif damage == "index-missing":
        file, match = shards / "documents.npy", "documents.npy: missing"
        file.unlink()
    else:
        file, match = shards / "manifest.json", "manifest.json: the shards are empty"
        manifest = json.loads(file.read_text())
        file.write_text(json.dumps(dict(manifest, num_tokens=0, num_documents=0)))
    config = load_config(data=train_config_dict(tmp_path / "run", shards))
    with pytest.raises(ShardError, match=match):
        Trainer(config)
    assert not (tmp_path / "run").exists()


def test_train_command_reports_bad_shards_by_file(tmp_path, shards, capsys):
    (shards / "tokens.bin").write_bytes(b"")
    config = write_toml(tmp_path / "train.toml", train_config_dict(tmp_path / "run", shards))
    assert cli.main(["train", str(config)]) == 2
    assert f"{shards / 'tokens.bin'}: 0 bytes, expected" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_training_rows_longer_than_the_model_positions_are_refused(tmp_path, shards):
    data = train_config_dict(tmp_path / "run", shards)
    data["data"]["seq_len"] = 65
    with pytest.raises(ConfigError, match=r"'data.seq_len' = 65: longer than the model's "
                                          r"max_position_embeddings \(64\)"):
        Trainer(load_config(data=data))
    assert not (tmp_path / "run").exists()


def test_prompt_longer_than_the_model_positions_is_refused(family_dir, capsys):
    engine = Engine.from_checkpoint(family_dir)
    assert engine.max_seq_len == 64
    with pytest.raises(ValueError, match="prompt of 64 tokens does not fit max_seq_len 64"):
        engine.generate([list(range(1, 60)) + [1] * 5], params=SamplingParams(max_new_tokens=2))
    ids = ",".join(["1"] * 80)
    assert cli.main(["generate", str(family_dir), "--prompt-ids", ids, "--max-new-tokens", "2"]) == 2
    assert "prompt of 80 tokens does not fit max_seq_len 64" in capsys.readouterr().err


def _partial_then_disk_full(real, path_of):
    """A writer that gets half its bytes onto disk, then fails as a full disk does."""
    def write(*args, **kwargs):
        real(*args, **kwargs)
        path = Path(path_of(*args, **kwargs))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return write


@pytest.mark.parametrize("writer", ["weights", "optimizer", "manifest"])
def test_disk_full_during_checkpoint_keeps_the_previous_checkpoint(tmp_path, shards, monkeypatch, writer):
    config = load_config(data=train_config_dict(tmp_path / "run", shards, steps=4,
                                                checkpoint={"every": 2, "keep": 1}))
    trainer = Trainer(config)
    trainer.run(max_steps=2)
    [good] = ckpt.list_checkpoints(config.run_dir)
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    files = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}

    if writer == "weights":
        import familial.checkpoint_io as io
        monkeypatch.setattr(io, "save_file", _partial_then_disk_full(io.save_file, lambda t, f, **k: f))
    elif writer == "optimizer":
        monkeypatch.setattr(ckpt.torch, "save", _partial_then_disk_full(torch.save, lambda o, f, **k: f))
    else:
        real = ckpt._write_manifest
        monkeypatch.setattr(ckpt, "_write_manifest",
                            _partial_then_disk_full(real, lambda d: Path(d) / ckpt.MANIFEST))
    with pytest.raises(OSError, match="No space left on device"):
        trainer.run()
    monkeypatch.undo()

    assert ckpt.list_checkpoints(config.run_dir) == [good]
    assert leftovers(ckpt.checkpoint_root(config.run_dir)) == []
    assert {p: p.read_bytes() for p in good.rglob("*") if p.is_file()} == files
    resumed = Trainer(config, resume="latest")
    assert resumed.state.step == 2
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert resumed.run().step == 4
    assert np.isfinite([p.detach().sum().item() for p in resumed.model.parameters()]).all()


@pytest.mark.parametrize("name, damage", [("tokenizer.json", "garbage"), ("tokenizer.json", "truncated"),
                                          ("tokenizer.json", "not-a-tokenizer"),
                                          ("tokenizer_config.json", "truncated")])
def test_export_refuses_damaged_tokenizer_files_and_writes_nothing(tmp_path, capsys, name, damage):
    family = tmp_path / "family"
    save_family(tiny_family(vocab_size=2048), family, tokenizer_source=ASSETS)
    file = family / name
    text = file.read_text()
    file.write_bytes({"garbage": b"\x89PNG\r\n\x1a\n\x00\xff", "truncated": text[:len(text) // 2].encode(),
                      "not-a-tokenizer": b'{"version": "1.0", "model": 5}'}[damage])
    assert cli.main(["export", str(family), str(tmp_path / "out"), "--member", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {file}: " in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _family_with(tmp_path, change=None, tokenizer=None, **config) -> Path:
    model = tiny_family(**config)
    if change is not None:
        with torch.no_grad():
            change(model)
    return save_family(model, tmp_path / "family", tokenizer_source=tokenizer)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_verify_rejects_non_finite_weights(tmp_path, capsys, value):
    family = _family_with(tmp_path, lambda m: m.model.layers["2"].mlp.down_proj.weight.view(-1).__setitem__(7, value))
    assert cli.main(["verify", str(family)]) == 2
    err = capsys.readouterr().err
    assert f"{family / 'model.safetensors'}: tensor 'model.layers.2.mlp.down_proj.weight' holds 1 " \
           f"non-finite value(s) (such as {value})" in err


@pytest.mark.parametrize("field, value", [("eos_token_id", 999999), ("eos_token_id", -5),
                                          ("bos_token_id", 999999), ("eos_token_id", [3, 61])])
def test_verify_rejects_token_ids_outside_the_vocabulary(tmp_path, capsys, field, value):
    family = _family_with(tmp_path)
    data = json.loads((family / "family.json").read_text())
    (family / "family.json").write_text(json.dumps(dict(data, **{field: value})))
    assert cli.main(["verify", str(family)]) == 2
    err = capsys.readouterr().err
    assert f"{family / 'family.json'}: field '{field}' = {value!r}" in err
    assert f"outside the vocabulary [0, {VOCAB})" in err


def test_verify_rejects_a_tokenizer_that_does_not_fit_the_family(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    family = _family_with(tmp_path, vocab_size=2048)
    tiny = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tiny.save(str(family / "tokenizer.json"))
    assert cli.main(["verify", str(family)]) == 2
    assert (f"{family / 'tokenizer.json'}: the tokenizer has only 3 ids for the family's vocab_size "
            f"2048") in capsys.readouterr().err
    shutil.rmtree(family)
    family = _family_with(tmp_path)
    shutil.copyfile(ASSETS / "tokenizer.json", family / "tokenizer.json")
    assert cli.main(["verify", str(family)]) == 2
    assert (f"{family / 'tokenizer.json'}: the tokenizer has 2048 ids, more than the family's "
            f"vocab_size {VOCAB}") in capsys.readouterr().err
    shutil.rmtree(family)
    family = _family_with(tmp_path, tokenizer=ASSETS, vocab_size=2048)
    assert cli.main(["verify", str(family)]) == 0


def test_disk_full_during_data_prepare_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import familial.data.shards as shard_module

    (tmp_path / "code.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    out = tmp_path / "shards"
    command = ["data", "prepare", str(tmp_path / "code.txt"), "--tokenizer", "demo", "--out", str(out),
               "--no-progress"]
    monkeypatch.setattr(shard_module, "open", disk_full_open(room=100), raising=False)
    assert cli.main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Errno" not in err
    assert re.search(rf"/\.shards\.tmp-[^/ ]+/tokens\.bin: No space left on device \(writing the shards "
                     rf"{re.escape(str(out))}; nothing of them is kept\)", err), err
    assert leftovers(tmp_path) == [] and not out.exists()
    monkeypatch.undo()

    # Staging directories of writers that died are removed by the next run; a live writer's stays.
    dead, live = tmp_path / ".shards.tmp-999999999-0abc", tmp_path / f".shards.tmp-{os.getppid()}-0abc"
    for staging in (dead, live):
        staging.mkdir()
        (staging / "tokens.bin").write_bytes(b"partial")
    assert cli.main(command) == 0
    assert leftovers(tmp_path) == [live.name] and (out / "manifest.json").is_file()


def test_disk_full_during_tokenizer_train_is_one_line(tmp_path, monkeypatch, capsys):
    import familial.data.tokenizer_train as tokenizer_train

    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    monkeypatch.setattr(tokenizer_train, "open", disk_full_open(room=1000), raising=False)
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", str(tmp_path / "text.txt"), "--vocab-size", "300",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"familial tokenizer: error: {out / 'tokenizer.json'}: No space left on device"
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "huge"])
def test_family_json_that_is_not_a_small_regular_file_is_refused(tmp_path, capsys, kind):
    family = _family_with(tmp_path)
    config = family / "family.json"
    config.unlink()
    if kind == "dev-zero":
        config.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(config)   # opening a FIFO would wait for a writer forever
    else:
        with open(config, "wb") as handle:
            handle.truncate(300 * 2**20)  # sparse: no disk used
    for command in (["info", str(family)], ["verify", str(family)], ["generate", str(family), "--prompt-ids", "1"]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        expected = "more than the" if kind == "huge" else "not a regular file"
        assert f"{config}: " in err and expected in err, err


def test_every_config_loader_refuses_a_file_that_is_not_utf8_in_one_line(tmp_path):
    from familial.train.exits_config import load_exits_config
    from familial.posttrain.grpo import load_config as load_grpo_config
    from familial.train.config import load_config as load_train_config

    latin = tmp_path / "config.toml"
    latin.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    for load, what in ((load_train_config, "training"), (lambda p: load_exits_config(p, []), "exits"),
                       (load_grpo_config, "GRPO")):
        with pytest.raises(ConfigError, match=rf"not a UTF-8 text file \(byte 11\); expected a TOML {what} config"):
            load(str(latin))
