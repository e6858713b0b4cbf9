"""The parallel layout: how many ranks each strategy takes, and the DeviceMesh over them.

Mesh dimensions, outermost first: pipeline, data-parallel replicate, data-parallel shard,
tensor. Tensor-parallel ranks are innermost so their frequent collectives stay on one node
(consecutive ranks); pipeline stages are outermost because they exchange the least.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from familial.config import ConfigError

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelDims:
    # data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2);
    # -1 takes whatever the world size leaves after the other dims
    dp_shard: int = -1
    # data-parallel ranks that hold full replicas (HSDP when dp_shard > 1 too)
    dp_replicate: int = 1
    # tensor-parallel ranks (Megatron-style column/row split of every layer and head)
    tp: int = 1
    # pipeline stages' ranks
    pp: int = 1

    @classmethod
    def from_config(cls, parallel, world_size: int) -> "ParallelDims":
        """From any object with dp_shard/dp_replicate/tp/pp attributes (the trainer's [parallel])."""
        dims = cls(dp_shard=getattr(parallel, "dp_shard", -1), dp_replicate=getattr(parallel, "dp_replicate", 1),
                   tp=getattr(parallel, "tp", 1), pp=getattr(parallel, "pp", 1))
        return dims.resolve(world_size)

    def resolve(self, world_size: int) -> "ParallelDims":
        for name in ("dp_replicate", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name} = {value!r}: expected an integer >= 1")
        fixed = self.dp_replicate * self.tp * self.pp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ConfigError(
                    f"world size {world_size} is not divisible by dp_replicate*tp*pp = {fixed}")
            dp_shard = world_size // fixed
        if not isinstance(dp_shard, int) or dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard = {self.dp_shard!r}: expected an integer >= 1 or -1")
        if dp_shard * fixed != world_size:
            raise ConfigError(
                f"parallel layout pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={dp_shard}"
                f" x tp={self.tp} needs {dp_shard * fixed} ranks, but the world size is {world_size}")
        return ParallelDims(dp_shard=dp_shard, dp_replicate=self.dp_replicate, tp=self.tp, pp=self.pp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the process group torchrun describes (no-op when already joined)."""
    if dist.is_initialized():
        return
    from datetime import timedelta

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def build_mesh(dims: ParallelDims, device: str | None = None) -> DeviceMesh:
    """The 4-D mesh (pp, dp_replicate, dp_shard, tp); size-1 dims are kept so names always resolve."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed initialised (launch with torchrun)")
    if dims.world_size != dist.get_world_size():
        raise ConfigError(f"parallel layout {dims.shape()} needs {dims.world_size} ranks,"
                          f" but the world size is {dist.get_world_size()}")
    return init_device_mesh(device or device_type(), dims.shape(), mesh_dim_names=DIM_NAMES)
