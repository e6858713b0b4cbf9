"""The tiny family, data, optimizer and single-process reference shared by the distributed tests."""

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from familial.config import FamilyConfig
from familial.model import FamilyModel
from familial.train.losses import (
    IGNORE_INDEX,
    count_targets,
    family_loss_sums,
    total_objective,
)

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, exits=[1, 3])


def family_config(overrides: dict) -> FamilyConfig:
    return FamilyConfig(**{**BASE, **overrides})


def make_family(overrides: dict, seed: int = 0) -> FamilyModel:
    torch.manual_seed(seed)
    return FamilyModel(family_config(overrides))


def batches(overrides: dict, steps: int, seed: int = 0, batch: int = 4, length: int = 16):
    """Deterministic (input_ids, shifted labels) with some positions masked out."""
    vocab = family_config(overrides).vocab_size
    generator = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, length + 1), generator=generator)
        labels = tokens[:, 1:].clone()
        labels[torch.rand(batch, length, generator=generator) < 0.15] = IGNORE_INDEX
        yield tokens[:, :-1], labels


def optimizer_factory(lr: float):
    def factory(module: torch.nn.Module) -> torch.optim.Optimizer:
        # foreach=False: the same per-parameter arithmetic for sharded and full tensors.
        return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01, foreach=False)
    return factory


def reference_run(overrides: dict, steps: int, weights: dict[int, float] | None = None, lr: float = 1e-3,
                  seed: int = 0, model=None, optimizer=None, skip: int = 0, distill: dict[int, float] | None = None,
                  batch: int = 4):
    """Per-step {exit: mean CE} (and {exit: mean KL}), and the first step's gradients, of plain
    single-process training."""
    torch.manual_seed(seed)
    model = model or make_family(overrides, seed)
    optimizer = optimizer or optimizer_factory(lr)(model)
    weights = weights or {e: 1.0 for e in model.config.exits}
    losses, kds, grads = [], [], None
    for step, (input_ids, labels) in enumerate(batches(overrides, steps, seed=seed, batch=batch)):
        if step < skip:
            continue
        sums = family_loss_sums(model, input_ids, labels, lambdas=weights, distill=distill)
        total_targets = count_targets(labels)
        total_objective(sums, total_targets).backward()
        if grads is None:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append({e: float(s.sums.ce) / total_targets for e, s in sums.items()})
        kds.append({e: float(sums[e].sums.kd) / total_targets for e in (distill or {})})
    return losses, grads, model, optimizer, kds


def _storages(tensor: torch.Tensor):
    """The plain storages behind a tensor (DTensors and other wrapper tensors unwrapped)."""
    if is_traceable_wrapper_subclass(tensor):
        for name in tensor.__tensor_flatten__()[0]:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
    else:
        yield tensor.untyped_storage()


class _Saved:
    __slots__ = ("__weakref__", "tensor")


@contextlib.contextmanager
def saved_bytes(exclude: set[int] = frozenset()):
    """Peak bytes of tensors autograd holds for backward inside the block (activation memory).

    Each storage counts once while any saved tensor uses it; storages whose data pointers
    are in `exclude` (e.g. the parameters') do not count. Gathered parameter copies (FSDP)
    do, so compare runs with the same model and layout.
    """
    live: dict[int, list[int]] = {}
    total, peak = [0], [0]

    def release(key: int) -> None:
        live[key][0] -= 1
        if not live[key][0]:
            total[0] -= live.pop(key)[1]

    def pack(tensor: torch.Tensor):
        holder = _Saved()
        holder.tensor = tensor
        for storage in _storages(tensor):
            key = storage.data_ptr()
            if key and key not in exclude:
                entry = live.setdefault(key, [0, storage.nbytes()])
                if not entry[0]:
                    total[0] += entry[1]
                    peak[0] = max(peak[0], total[0])
                entry[0] += 1
                weakref.finalize(holder, release, key)
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
        yield lambda: peak[0]


class OpCounter(TorchDispatchMode):
    """Counts, inside the block, collectives and reads of device data by the host.

    A collective is any c10d or functional-collective op. A host read is an op whose result
    the host must wait for: `_local_scalar_dense` (item, bool, float, int), `nonzero`,
    `masked_select`, or indexing with a boolean mask. `allowed(op, args)` exempts reads
    that are host-side by design (e.g. of labels that never leave the CPU).
    """

    READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}
    MASKED = {"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"}

    def __init__(self, allowed=lambda op, args: False):
        super().__init__()
        self.allowed = allowed
        self.collectives: list[str] = []
        self.host_reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("c10d.", "_c10d_functional.")) and "wait" not in name:
            self.collectives.append(name)
        read = name in self.READS or (name in self.MASKED and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())))
        if read and not self.allowed(name, args):
            self.host_reads.append(f"{name} on {args[0].dtype} {tuple(args[0].shape)}")
        return func(*args, **(kwargs or {}))
