"""The DeviceMesh of a parallel config, and joining the process group torchrun describes.

Mesh dimensions, outermost first: pipeline, data-parallel replicate, data-parallel shard,
tensor (ranks per dimension: `familial.train.config.ParallelConfig`, the one parallel-config
type). Tensor-parallel ranks are innermost so their frequent collectives stay on one node
(consecutive ranks); pipeline stages are outermost because they exchange the least.
"""

from __future__ import annotations

import os
import sys
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
    timeout = timedelta(seconds=timeout_s)
    store = store_of_this_start(timeout)
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, store=store,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def store_of_this_start(timeout: timedelta) -> dist.Store | None:
    """The key-value store for this torchrun start's process group, or None for torch's default.

    torchrun keeps one TCPStore across the restarts of its workers (`--max-restarts`) and torch
    does not give each start its own keys, so a restarted rank can read the address a dead rank
    published in the start before and time out connecting to it (pytorch#135712, #167288). With
    one torchrun agent every rank sees the same restart count, which then names a fresh
    namespace. Agents on several nodes count restarts each on their own, so there the shared
    store stays as it is and rank 0 says how to turn the sharing off.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        if os.environ.get("RANK") == "0" and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            print("warning: torchrun shares one store across restarts on several nodes, where a restarted"
                  " rank can read a dead rank's address and time out; launch torchrun with"
                  " TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 to give every restart a fresh store",
                  file=sys.stderr, flush=True)
        return None
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                is_master=False, timeout=timeout)
    return dist.PrefixStore(f"familial/start-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store)


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
