"""The global gradient norm of a parallel layout in one all-reduce, and clipping without a host sync.

A rank's gradients are local shards of DTensors on various meshes (FSDP's data-parallel
shard, tensor-parallel splits, both) or plain tensors, on one pipeline stage of several.
Each rank sums the squares of its local shards, each divided by how many ranks of its stage
hold that same shard (replicas over dp_replicate, over tensor-parallel ranks for a weight
tp does not split, or over a mesh dimension placed Replicate); one SUM all-reduce over the
world then gives the squared norm of the whole family, every shard counted once. The
scaling for clipping is computed on the device, so the only host synchronisation of the
step's clipping is reading the norm back once (as torchtitan's clip_grad_norm_, which also
avoids per-parameter `full_tensor()`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def copies(grad: torch.Tensor, stage_ranks: int) -> int:
    """How many of the `stage_ranks` ranks of a pipeline stage hold this very local shard."""
    if not isinstance(grad, DTensor):
        return stage_ranks
    distinct = 1
    for size, placement in zip(grad.device_mesh.shape, grad.placements):
        if not placement.is_replicate():
            distinct *= size
    return stage_ranks // distinct


def settle_partial_grads(parameters: Iterable[torch.Tensor]) -> None:
    """Sum every gradient still pending over its mesh (Partial) with one all-reduce per mesh.

    Without FSDP, the q/k norm weights a tensor-parallel block replicates get Partial
    gradients (each rank saw only its heads); left so, DTensor would all-reduce each of them
    separately inside the optimizer, and their norm could not be taken locally.
    """
    pending: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        grad = p.grad
        if isinstance(grad, DTensor) and any(q.is_partial() for q in grad.placements):
            if grad.device_mesh.ndim != 1:
                raise ValueError(f"a Partial gradient on a {grad.device_mesh.ndim}-D mesh: expected a 1-D"
                                 " tensor-parallel mesh")
            pending[(grad.device_mesh, grad.dtype)].append(p)
    for (mesh, _), params in pending.items():
        flat = torch.cat([p.grad.to_local().reshape(-1) for p in params])
        dist.all_reduce(flat, group=mesh.get_group())
        for p, part in zip(params, flat.split([p.grad.to_local().numel() for p in params])):
            p.grad = DTensor.from_local(part.view_as(p.grad.to_local()), mesh, [Replicate()], run_check=False)


def _local(grad: torch.Tensor) -> torch.Tensor:
    if isinstance(grad, DTensor):
        if any(p.is_partial() for p in grad.placements):
            raise ValueError("a Partial gradient: call settle_partial_grads after backward")
        return grad.to_local()
    return grad


def clip_grad_norm_(grads: Iterable[torch.Tensor], max_norm: float, stage_ranks: int,
                    device: torch.device, group=None) -> float:
    """The global L2 norm of `grads` over every rank of `group` (default: the world); when
    `max_norm > 0`, every gradient is scaled in place by min(1, max_norm / norm)."""
    by_copies: dict[int, list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        by_copies[copies(grad, stage_ranks)].append(_local(grad))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for count, tensors in by_copies.items():
        norms = torch._foreach_norm(tensors)
        total += torch.stack(norms).double().square().sum() / count
    dist.all_reduce(total, group=group)
    norm = total.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for tensors in by_copies.values():
            torch._foreach_mul_(tensors, scale.float())
    return float(norm)
