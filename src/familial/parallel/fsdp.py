"""Data parallelism with FSDP2 (`fully_shard`): sharded, replicated (HSDP) or both.

Every decoder layer (trunk and branch) is its own FSDP unit, so only one layer's full
weights exist at a time; the embedding, norms and heads stay in the root unit, which stays
gathered from the forward until the backward has passed it (the chunked exit losses read
the head weights directly, after the family's forward has returned). Gradients are SUMMED over data-parallel
ranks, not averaged: every loss is already divided by the global target count of the step.

Parameters stay float32 (the master weights, sharded with the AdamW state); the policy's
`param_dtype` is the compute dtype FSDP gathers them in, and gradients are reduced in float32.

Under gradient accumulation every micro-batch's gradients are reduce-scattered as soon as
its backward has passed a unit (as torchtitan does), and added to the rank's float32 shard:
no rank ever holds more than its shard of the gradients plus the unsharded gradients of the
unit in flight. Turning the sync off until the last micro-batch would save those reduce-
scatters but keep the whole model's unsharded gradients alive between micro-batches. With
HSDP only the all-reduce across replicas waits for the last micro-batch (`accumulation_sync`):
the partial sums are already sharded, so nothing unsharded is kept.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from familial.train.blocks import decoder_blocks


def mixed_precision(compute: torch.dtype) -> MixedPrecisionPolicy:
    """Gather parameters in `compute` (e.g. bf16); reduce gradients in float32."""
    return MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 else compute,
                                reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None,
               reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each decoder layer, then the root. `dp_mesh` is 1-D (shard) or 2-D (replicate, shard).

    Under pipeline parallelism pass reshard_after_forward=False: every micro-batch would
    otherwise gather each layer again for its backward.
    """
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for layer in decoder_blocks(model):
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM (gloo has no pre-multiplied sum; with factor 1 nothing is lost).
            module.set_force_sum_reduction_for_comms(True)
    return model


def accumulation_sync(model: FSDPModule):
    """`sync(last)` for `familial.train.forward_backward.accumulate`: reduce-scatter every micro-batch,
    all-reduce across HSDP replicas only after the last one."""
    def sync(last: bool) -> None:
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(last)
    return sync
