"""Parameters and FLOPs per token of each member, by the documented formula."""

from __future__ import annotations

import pytest
import torch

from familial.config import FamilyConfig
from familial.eval.cost import measure_latency, member_costs
from familial.model import FamilyModel


def config(**overrides) -> FamilyConfig:
    fields = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, exits=[1, 3],
                  branch_layers=2)
    return FamilyConfig(**(fields | overrides))


def test_flops_per_token_counts_every_matmul_and_attention_at_the_context():
    c = config()
    per_layer = (32 * 4 * 16 * 2      # q_proj and o_proj
                 + 32 * 2 * 16 * 2    # k_proj and v_proj
                 + 3 * 32 * 48)       # gate, up and down
    costs = member_costs(c, context=64)
    for cost, layers in zip(costs, (1 + 2, 4)):
        assert cost["layers"] == layers
        assert cost["matmul_parameters"] == layers * per_layer + 32 * 100   # + LM head
        assert cost["flops_per_token"] == 2 * cost["matmul_parameters"] + 4 * layers * 64 * 4 * 16
    family = FamilyModel(c)
    assert [x["parameters"] for x in costs] == [
        sum(p.numel() for p in family.member(e).parameters()) for e in c.exits]


def test_a_low_rank_matrix_costs_its_two_thin_factors():
    dense = member_costs(config(), 1)
    low = member_costs(config(low_rank={"model.layers.0.mlp.up_proj": 4}), 1)
    assert dense[0]["matmul_parameters"] - low[0]["matmul_parameters"] == 32 * 48 - (32 * 4 + 4 * 48)


def test_latency_needs_the_prompt_and_decode_to_fit_the_positions():
    model = FamilyModel(config(max_position_embeddings=32)).eval()
    with pytest.raises(ValueError, match="exceed the family's max_position_embeddings 32"):
        measure_latency(model, 1, prompt_tokens=30, decode_tokens=4)
    with torch.no_grad():
        timing = measure_latency(model, 1, prompt_tokens=8, decode_tokens=2, runs=1)
    assert set(timing) == {"prefill_ms", "decode_ms_per_token"}
