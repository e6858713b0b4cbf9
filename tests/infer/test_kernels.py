"""Packed kernels: the same outputs as the model's own modules, and never stale weights."""

from __future__ import annotations

import pytest
import torch

from familial.infer import Engine, SamplingParams
from familial.infer.cache import SlotCache
from familial.infer.kernels import Kernels, packable
from familial.infer.runner import Row, Runner

pytestmark = pytest.mark.skipif(not packable(torch.device("cpu"), torch.float32), reason="needs oneDNN")


def mixed_call(runner: Runner):
    """Two prompt chunks and, after them, two decoding rows: every kind of row in one call."""
    runner.forward([Row(0, 0, 5, length=6), Row(1, 0, 3, length=4)], tokens=list(range(10)))
    rows = [Row(0, 6, 5, length=3, all_logits=True), Row(1, 4, 3), Row(2, 0, 5, length=5)]
    return runner.forward(rows, tokens=list(range(20, 29)))


@pytest.mark.parametrize("architecture", [dict(attention_bias=False), dict(attention_bias=True),
                                          dict(qk_norm=False, tie_word_embeddings=True),
                                          dict(qk_norm=False, mlp_bias=True)],
                         ids=["qwen3", "qwen3-bias", "llama-tied", "llama-mlp-bias"])
def test_packed_layers_and_heads_give_the_modules_outputs(family_factory, architecture):
    family = family_factory(**architecture)
    runners = {mode: Runner(family, SlotCache(family.config, 3, 32), mode) for mode in ("eager", "packed")}
    # Then one decoding row alone: a one-row call runs on the packs laid out for one row.
    outputs = {mode: mixed_call(runner) + runner.forward([Row(0, 9, 5)], tokens=[7])
               for mode, runner in runners.items()}
    for eager, packed in zip(outputs["eager"], outputs["packed"]):
        torch.testing.assert_close(packed.logits, eager.logits, atol=1e-4, rtol=1e-4)
        assert packed.exit == eager.exit


def test_a_weight_update_repacks_before_the_next_call(family_factory):
    """A GRPO-style in-place update, a load_state_dict and a replaced parameter each reach the
    next call's outputs, as a runner built on the new weights gives them."""
    family, other = family_factory(seed=0), family_factory(seed=1)
    runner = Runner(family, SlotCache(family.config, 3, 32), "packed")
    mixed_call(runner)
    built = runner.kernels.packs
    with torch.no_grad():
        family.model.layers["2"].mlp.up_proj.weight.mul_(0.5)
    updates = [lambda: family.load_state_dict(other.state_dict()),
               lambda: setattr(family.lm_head, "weight", torch.nn.Parameter(other.lm_head.weight * 2))]
    for update in [None, *updates]:
        if update is not None:
            update()
        fresh = Runner(family, SlotCache(family.config, 3, 32), "eager")
        for got, want in zip(mixed_call(runner), mixed_call(fresh)):
            torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
        assert runner.kernels.packs > built
        built = runner.kernels.packs


def test_refresh_packs_every_layer_and_head_at_once(family):
    kernels = Kernels(family, "packed")
    kernels.refresh()
    config = family.config
    layers = config.num_hidden_layers + sum(config.branch_depth(e) for e in config.exits[:-1])
    heads = len({id(family.exit_head(e)) for e in config.exits})
    # Each laid out twice: for one-row calls and for calls of more rows.
    assert kernels.packs == 2 * (layers + heads)


def test_greedy_tokens_equal_the_eager_engines(family):
    prompts = [[5, 6, 7], [8] * 9, [1, 2], [40, 41, 42, 43, 44, 45]]
    params = SamplingParams(max_new_tokens=12, greedy=True)
    tokens = {mode: [r.token_ids for r in Engine(family, max_batch_size=4, kernels=mode).generate(prompts, 5, params)]
              for mode in ("eager", "packed")}
    assert tokens["packed"] == tokens["eager"]


def test_a_mode_the_device_lacks_is_refused(family):
    with pytest.raises(ValueError, match="kernels = 'fast'"):
        Kernels(family, "fast")
    with pytest.raises(ValueError, match="needs a CPU with oneDNN"):
        Kernels(family.to(torch.float16), "packed")


@pytest.mark.skipif(not packable(torch.device("cpu"), torch.bfloat16), reason="no bf16 instructions")
def test_bfloat16_weights_run_packed_where_the_cpu_has_bf16_instructions(family_factory):
    family = family_factory().to(torch.bfloat16)
    runners = {mode: Runner(family, SlotCache(family.config, 3, 32, dtype=torch.bfloat16), mode)
               for mode in ("eager", "packed")}
    assert runners["packed"].kernels.mode == "packed"
    # Then one decoding row alone.
    outputs = {mode: mixed_call(runner) + runner.forward([Row(0, 9, 5)], tokens=[7])
               for mode, runner in runners.items()}
    for eager, packed in zip(outputs["eager"], outputs["packed"]):
        # bf16 rounds at different points (the fused products round once, at their end).
        assert packed.logits.dtype == torch.bfloat16
        torch.testing.assert_close(packed.logits.float(), eager.logits.float(), atol=0.5, rtol=0.05)
