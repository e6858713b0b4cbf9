"""Llama-architecture families: import from and export to stock transformers' Llama."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_checkpoints import write_tiny_hf, write_tiny_llama
from familial import FamilyConfig
from familial.checkpoint_io import export_all, export_member, import_checkpoint, load_family
from familial.config import ConfigError

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
LLAMAS = {
    # SmolLM2's shape: tied embeddings, no biases; every exit's head is the embedding.
    "tied-shared-head": dict(overrides={"tie_word_embeddings": True}, shared_head=True),
    # Llama 3.1's rope scaling (the 32-token original context puts frequencies in all three
    # of its bands at head_dim 16), with attention and MLP biases.
    "llama3-rope-biases": dict(overrides={"rope_scaling": LLAMA3_ROPE, "attention_bias": True,
                                          "mlp_bias": True}, shared_head=False),
}


@pytest.mark.reference
@pytest.mark.parametrize("kind", sorted(LLAMAS))
def test_llama_imports_and_every_member_exports_as_stock_llama(tmp_path, kind):
    spec = LLAMAS[kind]
    dense = write_tiny_llama(tmp_path / "dense", **spec["overrides"])
    import_checkpoint(dense, tmp_path / "family", exits=[1, 3, 5], shared_head=spec["shared_head"])
    family = load_family(tmp_path / "family").eval()
    assert family.config.architecture == "llama" and not family.config.qk_norm
    assert not any("q_norm" in name or "k_norm" in name for name in family.state_dict())
    stock = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        outputs = family(ids)
        torch.testing.assert_close(outputs[5], stock(ids).logits, rtol=0, atol=1e-5)
    for path in export_all(tmp_path / "family", tmp_path / "members"):
        exit_layer = json.loads((path / "config.json").read_text())["familial"]["exit"]
        member = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert type(member) is LlamaForCausalLM
        assert member.config.tie_word_embeddings is family.config.tie_word_embeddings
        with torch.no_grad():
            torch.testing.assert_close(member(ids).logits, outputs[exit_layer], rtol=0, atol=1e-5)


@pytest.mark.reference
def test_llama3_rope_scaling_matters_and_needs_its_factors(tmp_path):
    """Dropping the scaling moves the logits past the 1e-5 the parity test allows, so that
    test checks the scaling; a llama3 entry without its frequency factors is refused."""
    dense = write_tiny_llama(tmp_path / "dense", rope_scaling=LLAMA3_ROPE)
    config = json.loads((dense / "config.json").read_text())
    import_checkpoint(dense, tmp_path / "family", exits=[5])
    scaled = load_family(tmp_path / "family").eval()
    del config["rope_parameters"]
    config["rope_theta"] = 100000.0
    (dense / "config.json").write_text(json.dumps(config))
    import_checkpoint(dense, tmp_path / "plain", exits=[5])
    plain = load_family(tmp_path / "plain").eval()
    ids = torch.randint(0, 97, (1, 48))
    with torch.no_grad():
        assert (scaled(ids)[5] - plain(ids)[5]).abs().max() > 1e-4
    fields = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, exits=[1], qk_norm=False)
    with pytest.raises(ConfigError, match="'low_freq_factor' must be a positive number"):
        FamilyConfig(**fields, rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0})
    with pytest.raises(ConfigError, match="'mlp_bias'.*set qk_norm to false"):
        FamilyConfig(**{**fields, "qk_norm": True}, mlp_bias=True)


def test_family_json_without_the_architecture_fields_loads_as_qwen3(tmp_path):
    """Families written before Llama support have no qk_norm/mlp_bias: they are Qwen3."""
    import_checkpoint(write_tiny_hf(tmp_path / "dense"), tmp_path / "family", exits=[2, 5])
    path = tmp_path / "family" / "family.json"
    data = json.loads(path.read_text())
    assert data["qk_norm"] is True
    del data["qk_norm"], data["mlp_bias"]
    path.write_text(json.dumps(data))
    family = load_family(tmp_path / "family")
    assert family.config.architecture == "qwen3"
    assert family.model.layers["0"].self_attn.q_norm is not None
    out = export_member(tmp_path / "family", tmp_path / "member", 2)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
