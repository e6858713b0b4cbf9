"""Block expansion: identity at init, only new blocks train, export as a deeper dense model."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from familial.checkpoint_io import export_member, load_family, save_family
from familial.config import ConfigError
from familial.train import params
from familial.posttrain.expand import (
    expand_member, freeze_except, frozen_parameter_patterns, trainable_parameter_patterns)

from posttrain_family import tiny_family


@pytest.fixture
def family():
    return tiny_family()


def _logits(model, exit_layer, ids):
    with torch.no_grad():
        return model(ids, exits=[exit_layer])[exit_layer]


@pytest.mark.parametrize("init", ["random", "clone"])
def test_expansion_keeps_every_member_output_bitwise(family, init):
    ids = torch.randint(0, 61, (2, 12))
    before = {e: _logits(family, e, ids) for e in family.config.exits}
    untouched = {n: p.clone() for n, p in family.named_parameters()}
    names = expand_member(family, 1, blocks=3, init=init, seed=1)
    assert names == ["branches.1.layers.1", "branches.1.layers.2", "branches.1.layers.3"]
    assert family.config.branch_layers == [4]
    assert [layer.cache_name for layer in family.branch_layers(1)] == [
        f"branches.1.layers.{i}" for i in range(4)]
    for e in family.config.exits:
        assert torch.equal(_logits(family, e, ids), before[e])
    for name, param in untouched.items():
        assert torch.equal(family.get_parameter(name), param)


def test_random_init_draws_gaussians_and_clone_copies_neighbour(family):
    cloned = copy.deepcopy(family)
    expand_member(family, 1, blocks=1, init="random", std=0.05, seed=3)
    expand_member(cloned, 1, blocks=1, init="clone")
    new, neighbour = family.branches["1"].layers[1], family.branches["1"].layers[0]
    q = new.self_attn.q_proj.weight
    assert abs(q.std().item() - 0.05) < 0.005 and not torch.equal(q, neighbour.self_attn.q_proj.weight)
    assert torch.equal(new.input_layernorm.weight, torch.ones(64))
    twin = cloned.branches["1"].layers[1]
    assert torch.equal(twin.mlp.gate_proj.weight, neighbour.mlp.gate_proj.weight)
    for layer in (new, twin):
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()


def test_only_new_output_and_down_projections_get_gradient_at_step_zero(family):
    expand_member(family, 1, blocks=2, seed=0)
    ids = torch.randint(0, 61, (2, 10))
    logits = family(ids, exits=[1])[1]
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1)).backward()
    for i in (1, 2):
        layer = family.branches["1"].layers[i]
        for name, param in layer.named_parameters():
            if name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                assert param.grad.abs().sum() > 0, name
            else:
                assert not param.grad.any(), name


def test_training_moves_new_blocks_and_leaves_frozen_parameters_bitwise(family):
    expand_member(family, 1, blocks=2, seed=0)
    patterns = trainable_parameter_patterns(family.config, 1)
    assert patterns == ["branches.1.layers.1.*", "branches.1.layers.2.*",
                        "branches.1.lm_head.*", "branches.1.norm.*"]
    trainable, frozen = freeze_except(family, patterns)
    assert trainable > 0 and frozen > 0
    before = {n: p.detach().clone() for n, p in family.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in family.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 61, (4, 16))
    for _ in range(3):
        logits = family(ids, exits=[1])[1]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, param in family.named_parameters():
        changed = not torch.equal(param, before[name])
        if name.startswith(("branches.1.layers.1.", "branches.1.layers.2.")) and "norm" not in name:
            assert changed, name
        elif not param.requires_grad:
            assert not changed, name


def test_trainer_freeze_list_leaves_exactly_the_trainable_patterns(family):
    expand_member(family, 1, blocks=2, seed=0)
    frozen = set(params.freeze(family, frozen_parameter_patterns(family.config, 1)))
    trainable = {n for n, p in family.named_parameters() if p.requires_grad}
    assert trainable and not trainable & frozen
    assert trainable == {n for n, _ in family.named_parameters()
                         if n.startswith(("branches.1.layers.1.", "branches.1.layers.2.",
                                          "branches.1.lm_head.", "branches.1.norm."))}


@pytest.mark.reference
def test_expanded_member_saves_loads_and_exports_as_deeper_dense_model(family, tmp_path):
    expand_member(family, 1, blocks=2, seed=0)
    with torch.no_grad():
        family.branches["1"].layers[2].mlp.down_proj.weight.normal_(0, 0.02)
    save_family(family, tmp_path / "family")
    loaded = load_family(tmp_path / "family")
    record = loaded.config.runtime["expansion"]["1"]
    assert record == {"first_new_layer": 1, "blocks": 2, "init": "random"}
    assert trainable_parameter_patterns(loaded.config, 1)[0] == "branches.1.layers.1.*"
    ids = torch.randint(0, 61, (2, 9))
    expected = _logits(family, 1, ids)
    assert torch.equal(_logits(loaded, 1, ids), expected)
    export_member(tmp_path / "family", tmp_path / "dense", 1)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert dense.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_expand_rejects_the_final_member_and_bad_counts(family):
    with pytest.raises(ConfigError, match="final exit"):
        expand_member(family, 3, blocks=1)
    with pytest.raises(ConfigError, match="blocks"):
        expand_member(family, 1, blocks=0)
    with pytest.raises(ConfigError, match="never expanded"):
        trainable_parameter_patterns(tiny_family().config, 1)
