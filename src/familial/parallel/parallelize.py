"""Every parallelism applied to a family (or one pipeline stage of it), in one place.

As torchtitan's `parallelize_*`: tensor parallelism -> activation checkpointing and compile
per block -> FSDP, each applied only where its mesh dimension is enabled, on a model still on
the meta device. A new dimension (e.g. context parallelism) is one more entry in
`familial.train.config.MESH_DIMS` and one more `apply_*` call here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from familial.parallel.fsdp import apply_fsdp, mixed_precision
from familial.parallel.mesh import dp_mesh
from familial.parallel.tensor_parallel import apply_tensor_parallel
from familial.train.blocks import apply_block_options
from familial.train.config import ParallelConfig, TrainConfig


def parallelize_family(model: nn.Module, mesh: DeviceMesh, dims: ParallelConfig, train: TrainConfig,
                       compute: torch.dtype) -> nn.Module:
    """Apply the layout `dims` (resolved) over `mesh` to `model` in place; returns it."""
    if dims.tp_enabled:
        apply_tensor_parallel(model, mesh["tp"], dims.sequence_parallel)
    apply_block_options(model, train.activation_checkpointing, train.compile)
    if dims.fsdp_enabled:
        # Under a pipeline each layer stays gathered from its forward to its backward unless
        # pp_reshard asks otherwise (`familial.parallel.fsdp`, docs/parallel.md).
        apply_fsdp(model, dp_mesh(mesh, dims), mixed_precision(compute),
                   reshard_after_forward=not dims.pp_enabled or dims.pp_reshard)
    return model
