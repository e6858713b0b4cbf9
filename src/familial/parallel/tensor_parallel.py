"""Tensor parallelism for a family (or a pipeline stage of one), applied from outside.

Megatron's split, written as plans: q/k/v and gate/up are column-parallel (each rank keeps
whole heads / a slice of the intermediate), o and down are row-parallel (one all-reduce per
block). The embedding is vocabulary-parallel; every exit's head is column-parallel over the
vocabulary: its weight is a DTensor sharded over the vocabulary, and the chunked exit loss
(`familial.train.losses`) runs on each rank's vocabulary slice, never gathering logits.
Qwen3's per-head q/k norms see only local heads, so their weights become replicated DTensors
on the head dimension and their gradients are summed over the tensor ranks.

With `sequence_parallel`, the residual stream between blocks is split along the sequence and
the RMSNorms run on the local tokens (activation memory / tp between the blocks).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from familial.config import ConfigError
from familial.model import LowRankLinear


def check_tensor_parallel(config, tp: int) -> None:
    """Clear errors for dimensions a tp-way split cannot divide."""
    checks = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }
    for name, value in checks.items():
        if value % tp:
            hint = " (GQA: each rank needs whole key/value heads)" if name == "num_key_value_heads" else ""
            raise ConfigError(f"family config: field '{name}' = {value} is not divisible by"
                              f" parallel.tp = {tp}{hint}")
    if config.low_rank:
        raise ConfigError(f"family config: field 'low_rank' = {sorted(config.low_rank)}: tensor"
                          " parallelism needs dense linears (train compressed members with tp = 1)")


def layer_plan(sequence_parallel: bool, qk_norm: bool = True) -> dict[str, object]:
    """Plan for one DecoderLayer (trunk or branch); `qk_norm`: it has Qwen3's head norms."""
    plan: dict[str, object] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
    }
    if qk_norm:
        head_norm = SequenceParallel(sequence_dim=2, use_local_output=True)  # (B, T, heads, D)
        plan.update({"self_attn.q_norm": head_norm, "self_attn.k_norm": head_norm})
    if not sequence_parallel:
        plan["self_attn.o_proj"] = RowwiseParallel()
        plan["mlp.down_proj"] = RowwiseParallel()
        return plan
    # Attention.forward(x, rotary, mask, cache, cache_name): only x changes layout.
    plan.update({
        "input_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None, None)),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    })
    return plan


def _head_style(sequence_parallel: bool) -> ColwiseParallel:
    # The loss reads the sharded weight directly; called as a module, logits stay vocabulary-sharded.
    return ColwiseParallel(input_layouts=Shard(1) if sequence_parallel else Replicate(),
                           output_layouts=Shard(-1), use_local_output=False)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> nn.Module:
    """Shard `model` (a FamilyModel or FamilyStage) over `tp_mesh` in place.

    Parts a pipeline stage does not hold (embedding, final norm, heads) may be None.
    """
    tp = tp_mesh.size()
    check_tensor_parallel(model.config, tp)
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            raise ConfigError(f"module '{name}' is low-rank: tensor parallelism needs dense linears")
    trunk = model.model
    if trunk.embed_tokens is not None:
        parallelize_module(trunk.embed_tokens, tp_mesh, RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1) if sequence_parallel else Replicate()))
    layers = list(trunk.layers.values())
    norms, heads = [], []
    if getattr(trunk, "norm", None) is not None:
        norms.append(trunk.norm)
    for branch in model.branches.values():
        layers.extend(branch.layers)
        norms.append(branch.norm)
        if branch.lm_head is not None:
            heads.append(branch.lm_head)
    if model.lm_head is not None:
        heads.append(model.lm_head)
    plan = layer_plan(sequence_parallel, model.config.qk_norm)
    for layer in layers:
        parallelize_module(layer, tp_mesh, plan)
    if sequence_parallel:
        for norm in norms:
            parallelize_module(norm, tp_mesh, SequenceParallel())
    for head in heads:
        parallelize_module(head, tp_mesh, _head_style(sequence_parallel))
    return model
