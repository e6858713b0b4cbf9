"""Data parallelism with FSDP2 (`fully_shard`): sharded, replicated (HSDP) or both.

Every decoder layer (trunk and branch) is its own FSDP unit, so only one layer's full
weights exist at a time; the embedding, norms and heads stay in the root unit, which is
gathered for the whole forward/backward of the stage (the chunked exit losses use the head
weights directly, outside any submodule's forward). Gradients are SUMMED over data-parallel
ranks, not averaged: every loss is already divided by the global target count of the step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp32": torch.float32}


def fsdp_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"mixed precision dtype '{value}': expected one of {sorted(DTYPES)}")
    return DTYPES[value]


def mixed_precision(param_dtype: str | torch.dtype | None, reduce_dtype: str | torch.dtype | None = "float32"
                    ) -> MixedPrecisionPolicy:
    """Compute in `param_dtype` (e.g. bf16) while master weights and reductions stay float32."""
    return MixedPrecisionPolicy(param_dtype=fsdp_dtype(param_dtype), reduce_dtype=fsdp_dtype(reduce_dtype))


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None,
               reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each decoder layer, then the root. `dp_mesh` is 1-D (shard) or 2-D (replicate, shard).

    Under pipeline parallelism pass reshard_after_forward=False: every micro-batch would
    otherwise gather each layer again for its backward.
    """
    mp_policy = mp_policy or MixedPrecisionPolicy()
    layers = list(model.model.layers.values())
    for branch in model.branches.values():
        layers.extend(branch.layers)
    for layer in layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM (gloo has no pre-multiplied sum; with factor 1 nothing is lost).
            module.set_force_sum_reduction_for_comms(True)
    return model
