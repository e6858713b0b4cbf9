"""Layout arithmetic and errors of familial.parallel that need no processes."""

import itertools

import pytest

from familial.config import ConfigError, FamilyConfig
from familial.parallel.pipeline import (
    build_schedule,
    check_boundaries,
    layer_costs,
    split_layers,
)
from familial.parallel.tensor_parallel import check_tensor_parallel
from familial.train.config import ParallelConfig


def family(**overrides) -> FamilyConfig:
    base = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, exits=[1, 5, 7])
    return FamilyConfig(**{**base, **overrides})


def stage_costs(config, bounds):
    costs = layer_costs(config)
    return [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_split_minimises_the_most_expensive_stage(stages):
    config = family()
    bounds = split_layers(config, stages)
    layers = config.num_hidden_layers
    best = min(max(stage_costs(config, [0, *cuts, layers]))
               for cuts in itertools.combinations(range(1, layers), stages - 1))
    assert bounds[0] == 0 and bounds[-1] == layers and len(bounds) == stages + 1
    assert max(stage_costs(config, bounds)) == best


def test_branches_and_heads_weigh_on_the_stage_of_their_exit():
    # A 4096-token head costs as much as ~10 of these layers: the stage holding exit 1
    # (branch + head) and the last stage (head) get fewer trunk layers.
    bounds = split_layers(family(), 2)
    plain = split_layers(family(vocab_size=8, exits=[7]), 2)
    assert plain == [0, 4, 8]
    assert bounds != plain


def test_published_family_splits_where_the_docs_say():
    config = FamilyConfig(vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                          num_attention_heads=40, num_key_value_heads=8, head_dim=128, exits=[2, 21, 39])
    assert split_layers(config, 2) == [0, 21, 40]
    assert split_layers(config, 4) == [0, 9, 21, 30, 40]


def test_layouts_a_pipeline_cannot_hold_are_refused():
    with pytest.raises(ConfigError, match="shared_head"):
        check_boundaries(family(shared_head=True), [0, 4, 8])
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        check_boundaries(family(tie_word_embeddings=True), [0, 4, 8])
    with pytest.raises(ConfigError, match=r"boundaries \[0, 4, 4, 8\]"):
        check_boundaries(family(), [0, 4, 4, 8])
    with pytest.raises(ConfigError, match="9 pipeline stages"):
        split_layers(family(), 9)
    check_boundaries(family(shared_head=True), [0, 1, 8])  # every exit in the last stage


def test_tensor_parallel_needs_whole_kv_heads():
    with pytest.raises(ConfigError, match=r"num_key_value_heads' = 2 is not divisible by parallel.tp = 4.*GQA"):
        check_tensor_parallel(family(), 4)
    with pytest.raises(ConfigError, match="vocab_size' = 97"):
        check_tensor_parallel(family(vocab_size=97), 2)
    check_tensor_parallel(family(), 2)


def test_parallel_layout_fills_and_checks_the_world():
    assert ParallelConfig(tp=2, pp=2).resolve(8).dp_shard == 2  # dp_shard = -1 takes the rest
    assert ParallelConfig().resolve(1).dims() == {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}
    assert ParallelConfig(tp=2, pp=2).resolve(8).tp_enabled and not ParallelConfig().resolve(1).fsdp_enabled
    with pytest.raises(ConfigError, match="needs 12 ranks, but the world size is 8"):
        ParallelConfig(dp_shard=3, tp=2, pp=2).resolve(8)
    with pytest.raises(ConfigError, match="parallel.tp = 0"):
        ParallelConfig(tp=0).resolve(8)
    with pytest.raises(ConfigError, match="parallel.pp = 2: one process runs the 1 x 1 x 1 x 1 mesh: launch with torchrun"):
        ParallelConfig(pp=2).resolve(1)
    with pytest.raises(ConfigError, match=r"c.toml: field 'parallel.dp_shard' = 0: expected an integer >= 1, or -1"):
        ParallelConfig(dp_shard=0).resolve(2, "c.toml")


def test_schedule_names_are_checked_and_zero_bubble_is_refused():
    with pytest.raises(ConfigError, match="'Looped': expected one of GPipe, 1F1B, Interleaved1F1B"):
        build_schedule("Looped", [], 4)
    with pytest.raises(ConfigError, match="zero-bubble schedules split backward"):
        build_schedule("ZBVZeroBubble", [], 4)


def test_distillation_before_the_last_pipeline_stage_is_refused():
    from familial.parallel.layout import check_distillation
    from familial.train.config import InitConfig, LossConfig, TrainConfig

    config = family()
    train = TrainConfig(init=InitConfig(model=config), loss=LossConfig(distill={"5": 0.2}))
    with pytest.raises(ConfigError, match=r"'loss.distill' key '5': exit 5 lies before the last pipeline stage"):
        check_distillation(train, config, ParallelConfig(pp=2, stage_boundaries=[0, 6, 8]))
    check_distillation(train, config, ParallelConfig(pp=2, stage_boundaries=[0, 4, 8]))
    check_distillation(train, config, ParallelConfig(tp=2))


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_activation_arithmetic_is_what_autograd_keeps(checkpointing, monkeypatch):
    """docs/parallel.md's activations per token per block, against one block at small scale."""
    import torch
    from family_fixtures import saved_bytes

    from familial.model import FamilyModel
    from familial.parallel.memory import activation_elements
    from familial.train import blocks

    config = family(hidden_size=256, intermediate_size=640, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=64)
    torch.manual_seed(0)
    model = FamilyModel(config)
    blocks.apply_block_options(model, checkpointing)
    block, tokens = model.model.layers["0"], 256
    x = torch.randn(2, tokens // 2, 256, requires_grad=True)
    rotary = tuple(t.detach() for t in model.rotary(torch.arange(tokens // 2).expand(2, -1), x.dtype))
    # Selective checkpointing keeps its matmul outputs itself: count what its policy keeps.
    kept = []
    policy = blocks._keep_matmuls

    def counting(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if decision == blocks.CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            outputs = ctx.op_output if isinstance(ctx.op_output, (tuple, list)) else [ctx.op_output]
            kept.append(sum(o.numel() for o in outputs if isinstance(o, torch.Tensor)))
        return decision

    monkeypatch.setattr(blocks, "_keep_matmuls", counting)
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *rotary]}
    with saved_bytes(exclude=shared) as peak:
        block(x, rotary)
    measured = (peak() / 4 + sum(kept)) / tokens
    heads = config.num_attention_heads + config.num_key_value_heads  # per-head statistics
    assert activation_elements(config, checkpointing) <= measured <= activation_elements(config, checkpointing) + 2 * heads + 2
