"""Import, export and save/load of family checkpoints, and the errors users see."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_checkpoints import write_tiny_hf
from familial import FamilyConfig, FamilyModel
from familial.checkpoint_io import (CheckpointError, export_all, export_member, import_checkpoint,
                                    load_family, save_family)
from familial.config import ConfigError
from familial.staging import OutputPathError


@pytest.fixture
def family_dir(tiny_hf, tmp_path):
    import_checkpoint(tiny_hf, tmp_path / "family", exits=[1, 3, 5],
                      member_names={"device": 1, "edge": 3})
    return tmp_path / "family"


@pytest.mark.reference
@pytest.mark.parametrize("member", ["device", "edge", 5])
def test_exported_member_loads_in_stock_transformers(family_dir, tmp_path, member):
    family = load_family(family_dir).eval()
    out = export_member(family_dir, tmp_path / "member", member)
    config = json.loads((out / "config.json").read_text())
    exit_layer = family.config.resolve_member(member)
    assert config["num_hidden_layers"] == family.config.member_layers(exit_layer)
    assert (out / "tokenizer_config.json").exists()
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, family(ids)[exit_layer], rtol=0, atol=1e-5)


def test_export_all_writes_every_member(family_dir, tmp_path):
    paths = export_all(family_dir, tmp_path / "all")
    assert sorted(p.name for p in paths) == ["device", "edge", "exit-5"]


@pytest.mark.reference
def test_tied_family_exports_branch_heads_untied(tmp_path):
    dense = write_tiny_hf(tmp_path / "dense", tie_word_embeddings=True)
    import_checkpoint(dense, tmp_path / "family", exits=[2, 5])
    family = load_family(tmp_path / "family")
    assert family.lm_head.weight is family.model.embed_tokens.weight
    with torch.no_grad():
        family.branches["2"].lm_head.weight.mul_(1.5)  # branch head diverged by training
    save_family(family, tmp_path / "trained")
    for member, tied in ((2, False), (5, True)):
        out = export_member(tmp_path / "trained", tmp_path / f"m{member}", member)
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids = torch.randint(0, 97, (1, 9))
        with torch.no_grad():
            torch.testing.assert_close(stock(ids).logits, family.eval()(ids)[member], rtol=0, atol=1e-5)


def test_save_load_is_bitwise(tmp_path):
    config = FamilyConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, exits=[1, 3],
                          torch_dtype="bfloat16")
    torch.manual_seed(3)
    model = FamilyModel(config).to(torch.bfloat16)
    save_family(model, tmp_path / "f")
    loaded = load_family(tmp_path / "f")
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, original[name]), name
    assert FamilyConfig.load(tmp_path / "f") == model.config


def test_sharded_source_and_missing_shard(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from hf_checkpoints import tiny_hf_config

    fields = {k: v for k, v in tiny_hf_config().items() if k not in ("architectures", "model_type")}
    dense = tmp_path / "sharded"
    Qwen3ForCausalLM(Qwen3Config(**fields)).save_pretrained(dense, max_shard_size="100KB")
    assert (dense / "model.safetensors.index.json").exists()
    import_checkpoint(dense, tmp_path / "family", exits=[2, 5])
    assert load_family(tmp_path / "family").config.exits == [2, 5]
    shard = sorted(dense.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}' is listed but missing"):
        import_checkpoint(dense, tmp_path / "family2", exits=[2, 5])
    assert not (tmp_path / "family2").exists()


def test_ruyi2_release_layout(tmp_path):
    """A checkpoint in the published Ruyi2 layout imports with its own exits and heads."""
    dense = write_tiny_hf(tmp_path / "dense")
    tensors = load_file(dense / "model.safetensors")
    torch.manual_seed(5)
    exits = [1, 3, 5]
    ruyi = {k: v for k, v in tensors.items() if k not in ("model.norm.weight", "lm_head.weight")}
    for k in range(len(exits)):
        ruyi[f"model.norms.{k}.weight"] = 1 + 0.1 * torch.randn(64)
        ruyi[f"lm_head.{k}.weight"] = torch.randn(97, 64) * 0.02
    for k, e in enumerate(exits[:-1]):
        for key, value in tensors.items():
            prefix = f"model.layers.{e}."
            if key.startswith(prefix):
                ruyi[f"model.eelayers.{k}.{key[len(prefix):]}"] = value + 0.01 * torch.randn_like(value)
    source = tmp_path / "ruyi"
    source.mkdir()
    save_file(ruyi, source / "model.safetensors")
    config = json.loads((dense / "config.json").read_text())
    config.update(model_type="ruyi_qwen3", early_exit_points=exits, shared_heads=False)
    (source / "config.json").write_text(json.dumps(config))

    import_checkpoint(source, tmp_path / "family")
    family = load_family(tmp_path / "family")
    assert family.config.exits == exits
    assert torch.equal(family.branches["3"].layers[0].mlp.up_proj.weight,
                       ruyi["model.eelayers.1.mlp.up_proj.weight"])
    assert torch.equal(family.branches["1"].norm.weight, ruyi["model.norms.0.weight"])
    assert torch.equal(family.model.norm.weight, ruyi["model.norms.2.weight"])
    assert torch.equal(family.branches["3"].lm_head.weight, ruyi["lm_head.1.weight"])
    assert torch.equal(family.lm_head.weight, ruyi["lm_head.2.weight"])
    with pytest.raises(ConfigError, match="keeps its own exits"):
        import_checkpoint(source, tmp_path / "other", exits=[2, 5])


def test_bad_inputs_are_named(family_dir, tiny_hf, tmp_path):
    with pytest.raises(ConfigError, match="last exit must be the last layer"):
        import_checkpoint(tiny_hf, tmp_path / "a", exits=[1, 3])
    with pytest.raises(ConfigError, match="outside the trunk"):
        import_checkpoint(tiny_hf, tmp_path / "a", exits=[1, 9])
    with pytest.raises(ConfigError, match="sorted"):
        import_checkpoint(tiny_hf, tmp_path / "a", exits=[3, 1, 5])
    with pytest.raises(ConfigError, match="duplicate"):
        import_checkpoint(tiny_hf, tmp_path / "a", exits=[1, 1, 5])
    with pytest.raises(ConfigError, match="needs trunk layers up to 6"):
        import_checkpoint(tiny_hf, tmp_path / "a", exits=[4, 5], branch_layers=3)
    assert not (tmp_path / "a").exists()
    with pytest.raises(OutputPathError, match="already exists"):
        import_checkpoint(tiny_hf, family_dir, exits=[1, 5])

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "family.json").write_text('{"vocab_size": 97,')
    with pytest.raises(ConfigError, match=r"family.json: malformed JSON at line 1"):
        load_family(broken)

    config = json.loads((family_dir / "family.json").read_text())
    config["hidden_size"] = 48
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    (mismatched / "family.json").write_text(json.dumps(config))
    (mismatched / "model.safetensors").write_bytes((family_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight' has shape \[97, 64\], "
                                              r"expected \[97, 48\]"):
        load_family(mismatched)

    tensors = load_file(family_dir / "model.safetensors")
    del tensors["branches.3.norm.weight"]
    save_file(tensors, mismatched / "model.safetensors")
    (mismatched / "family.json").write_text((family_dir / "family.json").read_text())
    with pytest.raises(CheckpointError, match=r"tensor 'branches.3.norm.weight' of shape \[64\] is missing"):
        load_family(mismatched)

    (mismatched / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_family(mismatched)

    with pytest.raises(ConfigError, match="unknown member 'phone'"):
        export_member(family_dir, tmp_path / "x", "phone")


def test_failed_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    config = FamilyConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, exits=[0, 1])
    model = FamilyModel(config)
    save_family(model, tmp_path / "f")
    before = (tmp_path / "f" / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("familial.checkpoint_io.save_file", disk_full)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    with pytest.raises(OSError, match="No space left"):
        save_family(model, tmp_path / "f", overwrite=True)
    assert (tmp_path / "f" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def _rewrite_weights(directory, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
# Each damage, and the one line that load, export and `familial export` all give for it.
DAMAGE = {
    "q_proj of the wrong shape": (lambda t: t.update({Q_PROJ: t[Q_PROJ][:32]}),
                                  rf"tensor '{Q_PROJ}' has shape \[32, 64\], expected \[64, 64\] from family.json"),
    "int64 weights": (lambda t: t.update({Q_PROJ: t[Q_PROJ].long()}),
                      rf"tensor '{Q_PROJ}' has dtype I64, expected a floating-point dtype"),
    "an extra tensor": (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}),
                        r"tensor 'model.layers.0.extra.weight' \(F32 \[3\]\) is not in family.json's "
                        r"configuration, which expects exactly \d+ tensors"),
    "a missing tensor": (lambda t: t.pop("branches.3.norm.weight"),
                         r"tensor 'branches.3.norm.weight' of shape \[64\] is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_export_refuses_what_load_refuses(family_dir, tmp_path, capsys, damage):
    from familial.cli import main

    change, message = DAMAGE[damage]
    _rewrite_weights(family_dir, change)
    with pytest.raises(CheckpointError, match=message):
        load_family(family_dir)
    with pytest.raises(CheckpointError, match=message):
        export_member(family_dir, tmp_path / "member", "edge")
    for argv in (["--member", "device"], ["--all"]):
        assert main(["export", str(family_dir), str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "family"]


def test_family_json_lists_checksums_and_verify_finds_a_flipped_bit(family_dir, capsys):
    from familial.cli import main

    weights = family_dir / "model.safetensors"
    listed = json.loads((family_dir / "family.json").read_text())["files"]
    assert listed == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert main(["verify", str(family_dir)]) == 0
    assert "sha256 of 1 tensor file(s) match family.json" in capsys.readouterr().out

    data = bytearray(weights.read_bytes())
    data[len(data) - 1000] ^= 0x10  # inside the tensor data, not the header
    weights.write_bytes(bytes(data))
    load_family(family_dir)  # names, shapes and dtypes still match: only the hash can tell
    with pytest.raises(CheckpointError, match=f"{weights}: sha256 .* does not match"):
        load_family(family_dir, verify=True)
    assert main(["verify", str(family_dir)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{weights}: sha256" in err


def test_family_json_without_checksums_still_loads_and_verify_says_so(family_dir, capsys):
    from familial.cli import main

    config = json.loads((family_dir / "family.json").read_text())
    del config["files"]
    (family_dir / "family.json").write_text(json.dumps(config))
    load_family(family_dir, verify=True)
    assert main(["verify", str(family_dir)]) == 0
    assert "nothing to hash: family.json lists no checksums" in capsys.readouterr().out


def test_calibration_keeps_the_checksums(family_dir):
    from familial.infer.calibrate import write_early_exit

    before = json.loads((family_dir / "family.json").read_text())["files"]
    write_early_exit(family_dir, {"metric": "top1", "thresholds": {"1": 0.5}})
    after = json.loads((family_dir / "family.json").read_text())
    assert after["files"] == before and after["runtime"]["early_exit"]["thresholds"] == {"1": 0.5}
    load_family(family_dir, verify=True)


@pytest.mark.reference
@pytest.mark.parametrize("ids, tokenizer, pad", [({"eos_token_id": 2}, False, 2),
                                                 ({"eos_token_id": 2}, True, 0),
                                                 ({"eos_token_id": [2, 1], "pad_token_id": 7}, True, 7)])
def test_exported_config_carries_a_pad_token_id(tmp_path, ids, tokenizer, pad):
    """Like Qwen3 checkpoints: the tokenizer's pad token (<|endoftext|>, id 0 in the shipped
    tokenizer), else the EOS id; family.json's own pad id first."""
    from importlib import resources

    from transformers import AutoConfig

    config = FamilyConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, exits=[0, 1], **ids)
    assets = resources.files("familial.data").joinpath("assets") if tokenizer else None
    save_family(FamilyModel(config), tmp_path / "family", tokenizer_source=assets)
    out = export_member(tmp_path / "family", tmp_path / "member", 0)
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == pad
    assert AutoConfig.from_pretrained(out).pad_token_id == pad
