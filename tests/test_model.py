"""The family model against stock transformers' Qwen3, and the family's structural promises."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_checkpoints import write_tiny_hf
from familial import FamilyConfig, FamilyModel
from familial.checkpoint_io import import_checkpoint, load_family
from familial.model import DecoderLayer, KVCache

VARIANTS = {
    "gqa-untied": {},
    "mha": {"num_key_value_heads": 4},
    "tied": {"tie_word_embeddings": True},
    "odd-head-dim": {"head_dim": 10, "num_attention_heads": 6, "num_key_value_heads": 3},
    "linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "yarn-rope": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 64}},
}


def _load_pair(tmp_path, exits, **overrides):
    dense = write_tiny_hf(tmp_path / "dense", **overrides)
    import_checkpoint(dense, tmp_path / "family", exits=exits)
    family = load_family(tmp_path / "family").eval()
    reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    return family, reference


@pytest.mark.reference
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_member_matches_transformers(tmp_path, variant):
    family, reference = _load_pair(tmp_path, [1, 3, 5], **VARIANTS[variant])
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 21))
    padding = torch.ones_like(ids)
    padding[0, :5] = 0  # left padding
    padding[2, -4:] = 0  # right padding
    with torch.no_grad():
        ours = family(ids, exits=[5])[5]
        theirs = reference(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        ours = family(ids, attention_mask=padding, exits=[5])[5]
        theirs = reference(ids, attention_mask=padding).logits
        valid = padding.bool()
        torch.testing.assert_close(ours[valid], theirs[valid], rtol=0, atol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize("branch_layers", [1, 2])
def test_member_after_import_is_truncated_dense_model(tmp_path, branch_layers):
    dense = write_tiny_hf(tmp_path / "dense")
    import_checkpoint(dense, tmp_path / "family", exits=[1, 3, 5], branch_layers=branch_layers)
    family = load_family(tmp_path / "family").eval()
    ids = torch.randint(0, 97, (2, 17))
    for exit_layer in (1, 3):
        reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
        keep = exit_layer + branch_layers
        reference.model.layers = reference.model.layers[:keep]
        reference.config.num_hidden_layers = keep
        reference.config.layer_types = reference.config.layer_types[:keep]
        with torch.no_grad():
            torch.testing.assert_close(family(ids)[exit_layer], reference(ids).logits,
                                       rtol=0, atol=1e-5)
            torch.testing.assert_close(family.member(exit_layer)(ids), reference(ids).logits,
                                       rtol=0, atol=1e-5)


def _tiny_family(**overrides) -> FamilyModel:
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, exits=[0, 2, 4],
                  branch_layers=[1, 2])
    fields.update(overrides)
    torch.manual_seed(0)
    return FamilyModel(FamilyConfig(**fields)).eval()


def test_forward_runs_the_trunk_once(monkeypatch):
    family = _tiny_family()
    calls = []
    original = DecoderLayer.forward

    def counting(self, *args, **kwargs):
        calls.append(self.cache_name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "forward", counting)
    family(torch.randint(0, 61, (2, 7)))
    trunk_calls = [name for name in calls if name.startswith("layers.")]
    assert sorted(trunk_calls) == sorted(f"layers.{i}" for i in range(5))
    assert len(calls) == 5 + 1 + 2  # trunk + branch of exit 0 + branch of exit 2

    calls.clear()
    family(torch.randint(0, 61, (2, 7)), exits=[2])
    assert calls == ["layers.0", "layers.1", "branches.2.layers.0", "branches.2.layers.1"]


def test_family_outputs_equal_member_outputs():
    family = _tiny_family()
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        outputs = family(ids)
        for e in family.config.exits:
            torch.testing.assert_close(outputs[e], family.member(e)(ids), rtol=0, atol=0)
        hidden = family(ids, return_hidden=True)
        for e in family.config.exits:
            torch.testing.assert_close(family.exit_head(e)(hidden[e]), outputs[e], rtol=0, atol=0)


def test_member_shares_parameters_without_copies():
    family = _tiny_family(shared_head=True)
    family_storage = {p.data_ptr() for p in family.parameters()}
    for e in family.config.exits:
        member = family.member(e)
        assert {p.data_ptr() for p in member.parameters()} <= family_storage
    assert family.member(0).lm_head is family.lm_head
    with torch.no_grad():
        family.model.layers["0"].mlp.up_proj.weight.add_(1.0)
    assert torch.equal(family.member(2).model.layers[0].mlp.up_proj.weight,
                       family.model.layers["0"].mlp.up_proj.weight)


def test_member_state_dict_is_dense_layout():
    family = _tiny_family()
    keys = set(family.member(2).state_dict())
    assert "model.layers.3.mlp.down_proj.weight" in keys  # trunk 0-1 + 2 branch layers
    assert "model.layers.4.mlp.down_proj.weight" not in keys
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys
    assert not any(key.startswith("branches") for key in keys)


def test_cached_decoding_equals_full_forward():
    family = _tiny_family()
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full = family(ids)
        cache = KVCache()
        prefix = family(ids[:, :8], cache=cache)
        steps = [prefix]
        for t in range(8, 12):
            steps.append(family(ids[:, t:t + 1], position_ids=torch.full((2, 1), t), cache=cache))
        for e in family.config.exits:
            stitched = torch.cat([step[e] for step in steps], dim=1)
            torch.testing.assert_close(stitched, full[e], rtol=0, atol=1e-5)


def test_unknown_member_is_named():
    family = _tiny_family(member_names={"device": 0})
    assert family.member("device").exit_layer == 0
    assert family.member("exit-2").exit_layer == 2
    with pytest.raises(ValueError, match="unknown member 'phone'.*device"):
        family.member("phone")
    with pytest.raises(ValueError, match="unknown member 3"):
        family.member(3)
