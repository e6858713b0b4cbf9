"""The DeviceMesh of a parallel config, and joining the process group torchrun describes.

Mesh dimensions, outermost first: pipeline, data-parallel replicate, data-parallel shard,
tensor (ranks per dimension: `familial.train.config.ParallelConfig`, the one parallel-config
type). Tensor-parallel ranks are innermost so their frequent collectives stay on one node
(consecutive ranks); pipeline stages are outermost because they exchange the least.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from familial.config import ConfigError
from familial.train.config import ParallelConfig


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the process group torchrun describes (no-op when already joined)."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def build_mesh(parallel: ParallelConfig, device_type: str = "cpu") -> DeviceMesh:
    """The mesh of `parallel.dims()`, by name; size-1 dims are kept so names always resolve."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed initialised (launch with torchrun)")
    if parallel.world_size != dist.get_world_size():
        raise ConfigError(f"parallel config {parallel.dims()} needs {parallel.world_size} ranks,"
                          f" but the world size is {dist.get_world_size()}")
    dims = parallel.dims()
    return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))


def dp_mesh(mesh: DeviceMesh, parallel: ParallelConfig) -> DeviceMesh:
    """The data-parallel mesh FSDP shards over: 1-D (shard), or 2-D (replicate, shard) for HSDP."""
    return mesh["dp_replicate", "dp_shard"] if parallel.dp_replicate_enabled else mesh["dp_shard"]


def dp_rank(mesh: DeviceMesh, parallel: ParallelConfig) -> int:
    """This rank's index among the data-parallel ranks (which slice of the global batch it reads)."""
    return mesh["dp_replicate"].get_local_rank() * parallel.dp_shard + mesh["dp_shard"].get_local_rank()
