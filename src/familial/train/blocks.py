"""How each decoder block runs: activation checkpointing and torch.compile, in every layout.

Both wrap a block's `forward` on the instance, never the module, so parameter names (and
checkpoints) do not change. Applied after tensor parallelism and before FSDP (torchtitan's
order): FSDP's gather/reshard hooks sit on the block itself and stay outside the compiled,
recomputed region; tensor parallelism's hooks on the block's linears are traced inside it.

- `full`: only a block's input is kept; everything inside is recomputed in backward.
- `selective` (op-level): the outputs of matrix multiplications and of attention are kept,
  the cheap ops between them (RMSNorm, SiLU, rotary, residual adds) are recomputed. It keeps
  most of the memory saving of `full` at a small fraction of its recomputation cost.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from familial.model import DecoderLayer

CHECKPOINTING = ("none", "full", "selective")

_aten = torch.ops.aten
# Ops whose outputs selective checkpointing keeps: every matmul and every attention kernel.
KEEP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten._scaled_mm.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_attention_math.default}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def decoder_blocks(model: nn.Module) -> list[DecoderLayer]:
    """Every decoder block of a family (or pipeline stage): trunk layers and branch layers."""
    return [module for module in model.modules() if isinstance(module, DecoderLayer)]


def apply_block_options(model: nn.Module, checkpointing: str = "none", compile: bool = False) -> None:
    """Activation checkpointing (`none` | `full` | `selective`) and torch.compile per block, in place."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing = {checkpointing!r}: expected one of {', '.join(CHECKPOINTING)}")
    for block in decoder_blocks(model):
        forward = block.forward
        if checkpointing == "full":
            forward = functools.partial(checkpoint, forward, use_reentrant=False)
        elif checkpointing == "selective":
            forward = functools.partial(checkpoint, forward, use_reentrant=False, context_fn=_selective_context)
        if compile:
            forward = _compiled(forward)
        block.forward = forward


def _compiled(forward):
    compiled = torch.compile(forward, fullgraph=True)

    def run(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # A tensor-parallel embedding hands over an in-flight collective's result (a wrapper
        # tensor, kept as one through views). Given to a compiled graph, its backward would
        # return a plain gradient where DTensor's expects its own; a copy materialises it.
        if type(hidden) is not torch.Tensor:
            hidden = hidden.clone()
        return compiled(hidden, *args, **kwargs)
    return run
