"""The multi-exit objective: per-exit cross-entropy (and optional self-distillation), chunked.

    L_total(t) = sum_k lambda_k(t) * CE_k  +  sum_k mu_k(t) * KL(p_deepest || q_k)

Every term is a SUM over target tokens; the caller divides by the number of target tokens
of the whole optimizer step (all micro-batches, all ranks), so the result is exact under
gradient accumulation and padding. A head is applied chunk by chunk, so no exit ever holds
its full (tokens, vocab) logits: peak memory with K exits stays close to one exit's, even at
a 150k vocabulary. The deepest exit forms its gradients in the forward pass (its backward
runs right after); the others recompute their logits in backward rather than keep a
(vocab, hidden) head gradient alive from forward to backward.

Under tensor parallelism a head's weight is a DTensor sharded over the vocabulary; the
same loss then runs on this rank's vocabulary slice, with the softmax normaliser, the
target logit and the hidden-state gradient summed over the tensor-parallel group, so the
sharded loss is chunked exactly like the unsharded one and never gathers logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024


class _ChunkedLinearLoss(torch.autograd.Function):
    """ce_weight * CE + kd_weight * KL of rows `hidden` (M, H) through a bias-free head (V, H).

    Returns (objective, ce_sum, kd_sum); only the objective is differentiable. KL is
    KL(softmax(teacher_hidden @ teacher_weight.T) || softmax(hidden @ weight.T)) summed over
    rows (zero without a teacher). No (M, V) tensor ever exists: logits are formed chunk by
    chunk, and the gradient of a chunk's logits is q - onehot for CE and q - p for KL.

    Where the gradients are formed is `eager`'s choice. Eager: in the forward pass, from the
    logits it already has (the head runs once), saved for backward; then the exit holds a
    whole (V, H) head gradient from its forward to its backward. Otherwise: the forward keeps
    only each row's log-normaliser (M floats) and backward recomputes each chunk's logits
    (one more head matmul, two with a teacher), so nothing of the head's size waits for
    backward. `family_loss_sums` makes only the deepest exit eager: its loss is computed
    last and its backward runs first, so its gradient is alive for no longer either way.

    With a process `group`, `weight` and `teacher_weight` hold vocabulary rows
    [vocab_start, vocab_start + V_local) of a head sharded over the group; the normalisers,
    the sums and dL/dhidden are summed over the group, and `valid` (rows whose target lies
    in this slice) masks the target terms arithmetically: no data-dependent indexing, so no
    host synchronisation.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, teacher_hidden, teacher_weight, ce_weight, kd_weight,
                group, vocab_start, eager):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        ce_sum = hidden.new_zeros((), dtype=_loss_dtype(hidden.dtype))
        kd_sum = torch.zeros_like(ce_sum)
        local_targets = targets - vocab_start
        valid = (local_targets >= 0) & (local_targets < weight.shape[0])
        local_targets = local_targets.clamp(0, weight.shape[0] - 1)
        w = weight.to(hidden.dtype)
        tw = None if teacher_weight is None else teacher_weight.to(hidden.dtype)
        normalisers = hidden.new_empty(hidden.shape[0], dtype=ce_sum.dtype)
        teacher_normalisers = None if teacher_hidden is None else torch.empty_like(normalisers)
        grads = _Grads(hidden, weight, need_hidden and eager, need_weight and eager)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_q, normalisers[rows] = _log_probs(hidden[rows], w, group)      # (chunk, V_local)
            ce_sum -= _picked(log_q, local_targets[rows], valid[rows]).sum()
            p = None
            if teacher_hidden is not None:
                log_p, teacher_normalisers[rows] = _log_probs(teacher_hidden[rows], tw, group)
                p = log_p.exp()
                kd_sum += (p * (log_p - log_q)).sum()
                del log_p
            if grads.wanted:
                grads.add(rows, _grad_logits(log_q, p, local_targets[rows], valid[rows], ce_weight, kd_weight),
                          hidden, w)
        if group is not None:
            # Each rank holds its vocabulary slice's share of the sums (and of dL/dhidden).
            sums = torch.stack((ce_sum, kd_sum))
            dist.all_reduce(sums, group=group)
            ce_sum, kd_sum = sums[0].clone(), sums[1].clone()
        if eager:
            ctx.save_for_backward(*grads.finish(group))
        else:
            ctx.save_for_backward(hidden, weight, local_targets, valid, normalisers, teacher_hidden, teacher_weight,
                                  teacher_normalisers)
        ctx.eager, ctx.chunk, ctx.group = eager, chunk, group
        ctx.weights = (ce_weight, kd_weight)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return ce_sum * ce_weight + kd_sum * kd_weight, ce_sum, kd_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_objective, _grad_ce, _grad_kd):
        none = (None,) * 9
        if ctx.eager:
            grad_hidden, grad_weight = ctx.saved_tensors
            # Used once, so scaled in place (no copy of (V, H)); a multiply, not a test of
            # the value, so no host synchronisation.
            for grad in (grad_hidden, grad_weight):
                if grad is not None:
                    grad.mul_(grad_objective.to(grad.dtype))
            return grad_hidden, grad_weight, *none
        hidden, weight, local_targets, valid, normalisers, teacher_hidden, teacher_weight, teacher_normalisers = \
            ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        ce_weight, kd_weight = ctx.weights
        w = weight.to(hidden.dtype)
        tw = None if teacher_weight is None else teacher_weight.to(hidden.dtype)
        grads = _Grads(hidden, weight, need_hidden, need_weight)
        scale = grad_objective.to(normalisers.dtype)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            log_q = _logits(hidden[rows], w).sub_(normalisers[rows, None])
            p = None
            if teacher_hidden is not None:
                p = _logits(teacher_hidden[rows], tw).sub_(teacher_normalisers[rows, None]).exp_()
            grad_logits = _grad_logits(log_q, p, local_targets[rows], valid[rows], ce_weight, kd_weight)
            grads.add(rows, grad_logits.mul_(scale), hidden, w)
        grad_hidden, grad_weight = grads.finish(ctx.group)
        return grad_hidden, grad_weight, *none


class _Grads:
    """dL/dhidden (M, H) and dL/dweight (V_local, H) accumulated chunk by chunk."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, need_hidden: bool, need_weight: bool) -> None:
        self.hidden = torch.empty_like(hidden) if need_hidden else None
        self.weight = None
        self.need_weight, self.weight_like = need_weight, weight
        self.wanted = need_hidden or need_weight

    def add(self, rows: slice, grad_logits: torch.Tensor, hidden: torch.Tensor, w: torch.Tensor) -> None:
        grad_logits = grad_logits.to(hidden.dtype)
        if self.hidden is not None:
            self.hidden[rows] = grad_logits @ w
        if self.need_weight:
            part = grad_logits.T @ hidden[rows]
            if self.weight is None:
                self.weight = part.to(_loss_dtype(self.weight_like.dtype))
            else:
                self.weight += part

    def finish(self, group) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if group is not None and self.hidden is not None:
            dist.all_reduce(self.hidden, group=group)
        if self.need_weight and self.weight is None:  # no target rows at all
            self.weight = torch.zeros_like(self.weight_like)
        weight = None if self.weight is None else self.weight.to(self.weight_like.dtype)
        return self.hidden, weight


def _picked(log_q: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each row's log-probability of its target, zero where the target is another rank's."""
    index = torch.arange(log_q.shape[0], device=log_q.device)
    return log_q[index, targets].masked_fill(~valid, 0.0)


def _grad_logits(log_q: torch.Tensor, p: torch.Tensor | None, targets: torch.Tensor, valid: torch.Tensor,
                 ce_weight: float, kd_weight: float) -> torch.Tensor:
    """d(ce_weight CE + kd_weight KL)/dlogits of one chunk, reusing log_q's memory."""
    grad = log_q.exp_().mul_(ce_weight + kd_weight)
    index = torch.arange(grad.shape[0], device=grad.device)
    grad.index_put_((index, targets), valid.to(grad.dtype) * -ce_weight, accumulate=True)
    if p is not None:
        grad.sub_(p, alpha=kd_weight)
    return grad


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax and sums in at least float32 (as HF does for bf16 logits).
    return torch.promote_types(dtype, torch.float32)


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # (chunk, H) @ (H, V) in the activations' dtype; softmax in at least float32.
    return (hidden @ weight.T).to(_loss_dtype(hidden.dtype))


def _log_probs(hidden: torch.Tensor, weight: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax of the chunk's logits, each row's log-normaliser); the normaliser spans the group."""
    logits = _logits(hidden, weight)
    top = logits.max(dim=-1, keepdim=True).values
    if group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total = (logits - top).exp_().sum(dim=-1, keepdim=True)
    if group is not None:
        dist.all_reduce(total, group=group)
    normaliser = top + total.log_()
    return logits.sub_(normaliser), normaliser.squeeze(1)


def _vocab_shard(weight: torch.Tensor):
    """(local weight, process group, first vocabulary row) of a head weight, sharded or not."""
    if not isinstance(weight, DTensor):
        return weight, None, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if weight.device_mesh.ndim != 1 or not isinstance(weight.placements[0], Shard) \
            or weight.placements[0].dim != 0:
        raise ValueError(f"a head weight sharded as {weight.placements} on a {weight.device_mesh.ndim}-D mesh:"
                         " expected the vocabulary (dim 0) sharded over one tensor-parallel dimension")
    _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return weight.to_local(), weight.device_mesh.get_group(), int(offset[0])


def _module_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 teacher: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden)
    log_q = torch.log_softmax(logits.to(_loss_dtype(logits.dtype)), dim=-1)
    ce = -log_q.gather(1, targets[:, None]).sum()
    if teacher is None:
        return ce, ce.new_zeros(())
    return ce, (teacher.exp() * (teacher - log_q)).sum()


T = TypeVar("T")
U = TypeVar("U")


@dataclass
class ExitSums(Generic[T]):
    """Token-loss sums (or means) of the exits, one field per per-exit loss term.

    The one value every layer passes whole, from the loss through the layouts and pipeline
    stages to the metrics: a new term is a field here, its computation in `exit_loss_sum`, its
    weight in `term_weights` and its lines in the metrics. A field holds one exit's 0-d sum
    (`ExitLoss.sums`), a float64 vector indexed like `config.exits` (a step's sums: `zeros`,
    `add_`, `all_reduce`), or on the host {exit: value} for the exits the term was computed
    for (`per_exit`).
    """

    ce: T  # token cross-entropy
    kd: T  # token KL(deepest exit || this exit); zero without a teacher

    def terms(self) -> dict[str, T]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def map(self, fn: Callable[[T], U]) -> ExitSums[U]:
        return ExitSums(**{name: fn(value) for name, value in self.terms().items()})

    @staticmethod
    def zeros(exits: int, device: torch.device | None = None) -> ExitSums[torch.Tensor]:
        return ExitSums(**{f.name: torch.zeros(exits, dtype=torch.float64, device=device)
                           for f in fields(ExitSums)})

    def add_(self, index: int, sums: ExitSums[torch.Tensor]) -> None:
        """Add one exit's 0-d sums at `index` of these vectors (no host synchronisation)."""
        for name, total in self.terms().items():
            total[index] += getattr(sums, name).double().to(total.device)

    def all_reduce(self, group=None) -> ExitSums[torch.Tensor]:
        """These vectors summed over the group's processes, on the host, in one collective."""
        names = list(self.terms())
        stacked = torch.stack(list(self.terms().values())).cpu()
        dist.all_reduce(stacked, group=group)
        return ExitSums(**dict(zip(names, stacked)))

    def per_exit(self, exits: list[int], lambdas: dict[int, float],
                 distill: dict[int, float]) -> ExitSums[dict[int, float]]:
        """Host {exit: value} of these vectors: CE for every computed exit, another term where it has a weight."""
        weights = term_weights(lambdas, distill).terms()
        computed = {e for e in exits if any(w.get(e) for w in weights.values())}

        def host(name: str, vector: torch.Tensor) -> dict[int, float]:
            values = vector.tolist()
            return {e: values[i] for i, e in enumerate(exits)
                    if (e in computed if name == "ce" else weights[name].get(e))}

        return ExitSums(**{name: host(name, vector) for name, vector in self.terms().items()})

    def objective(self, lambdas: dict[int, float], distill: dict[int, float]) -> float:
        """sum_k lambda_k CE_k + mu_k KL_k of host sums (the loss that was backpropagated, times the targets)."""
        weights = term_weights(lambdas, distill).terms()
        return sum(sum(weights[name].get(e, 0.0) * v for e, v in values.items())
                   for name, values in self.terms().items())


def term_weights(lambdas: dict[int, float], distill: dict[int, float]) -> ExitSums[dict[int, float]]:
    """Each term's per-exit weight: lambda for CE, mu for the KL against the deepest exit."""
    return ExitSums(ce=lambdas, kd=distill)


@dataclass
class ExitLoss:
    objective: torch.Tensor         # ce_weight * sums.ce + kd_weight * sums.kd: backpropagate this
    sums: ExitSums[torch.Tensor]    # 0-d token sums (detached, at least float32)
    count: int                      # target tokens the sums cover


def exit_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                  chunk_size: int = DEFAULT_CHUNK, teacher_hidden: torch.Tensor | None = None,
                  teacher_head: nn.Module | None = None, ce_weight: float = 1.0,
                  kd_weight: float = 0.0, scale: float = 1.0, eager: bool = True) -> ExitLoss:
    """Token-loss sums of one exit from its normed hidden state (B, T, H) and its head.

    labels (B, T) are already shifted; IGNORE_INDEX marks positions without a target. Labels
    on the CPU (what the trainer passes) have their target rows picked on the host: the row
    selection has a data-dependent size, so labels on the GPU would cost a synchronisation.
    `eager` forms the gradients in forward (see `_ChunkedLinearLoss`). With a
    teacher (the deepest exit's hidden state and head), the KL term is computed too; the
    teacher is always detached. `objective` is scaled by `scale`: pass 1 / (the step's global
    target count), or divide it yourself before backward (scaling here is free: the
    gradients are formed with it, instead of rescaled in backward). Usable on its own by a
    pipeline stage holding one exit.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size = {chunk_size}: expected a positive integer")
    # A sequence-parallel hidden state is gathered first: the loss needs every row on every rank.
    hidden = hidden.full_tensor() if isinstance(hidden, DTensor) else hidden
    if isinstance(teacher_hidden, DTensor):
        teacher_hidden = teacher_hidden.full_tensor()
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    targets = flat_labels.index_select(0, keep)
    keep, targets = _to_device(keep, flat.device), _to_device(targets, flat.device)
    rows = flat.index_select(0, keep)
    teacher_rows = None
    if teacher_hidden is not None:
        if teacher_head is None:
            raise ValueError("a teacher hidden state needs its head (teacher_head)")
        teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, keep)
    if _is_plain_linear(head) and (teacher_head is None or _is_plain_linear(teacher_head)):
        weight, group, vocab_start = _vocab_shard(head.weight)
        teacher_weight = None if teacher_head is None else _vocab_shard(teacher_head.weight.detach())[0]
        objective, ce, kd = _ChunkedLinearLoss.apply(rows, weight, targets, chunk_size, teacher_rows, teacher_weight,
                                                     float(ce_weight) * scale, float(kd_weight) * scale, group,
                                                     vocab_start, eager)
        return ExitLoss(objective, ExitSums(ce, kd), int(keep.numel()))
    # Any other head (e.g. a low-rank one): the same chunking through activation checkpointing.
    ce = rows.new_zeros((), dtype=_loss_dtype(rows.dtype))
    kd = torch.zeros_like(ce)
    for start in range(0, rows.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        teacher = None
        if teacher_rows is not None:
            with torch.no_grad():
                logits = teacher_head(teacher_rows[part])
                teacher = torch.log_softmax(logits.to(_loss_dtype(logits.dtype)), dim=-1)
        chunk_ce, chunk_kd = checkpoint(_module_loss, head, rows[part], targets[part], teacher,
                                        use_reentrant=False)
        ce, kd = ce + chunk_ce, kd + chunk_kd
    return ExitLoss((ce * ce_weight + kd * kd_weight) * scale, ExitSums(ce.detach(), kd.detach()), int(keep.numel()))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()  # an asynchronous copy: the host does not wait for the GPU
    return tensor.to(device, non_blocking=True)


def _is_plain_linear(head: nn.Module) -> bool:
    return type(head) is nn.Linear and head.bias is None


def family_loss_sums(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     lambdas: dict[int, float] | None = None, distill: dict[int, float] | None = None,
                     chunk_size: int = DEFAULT_CHUNK, attention_mask: torch.Tensor | None = None,
                     scale: float = 1.0) -> dict[int, ExitLoss]:
    """One trunk pass of a FamilyModel -> {exit: ExitLoss} for the exits with a weight.

    `lambdas` weighs each exit's CE (default: every exit, weight 1); `distill` weighs the KL
    of shallower exits against the deepest one. Exits without any weight are not computed.
    Objectives are multiplied by `scale` (see `exit_loss_sum`).
    """
    config = model.config
    lambdas = {e: 1.0 for e in config.exits} if lambdas is None else lambdas
    distill = {e: w for e, w in (distill or {}).items() if w and e != config.exits[-1]}
    wanted = sorted(e for e in config.exits if lambdas.get(e) or e in distill)
    deepest = config.exits[-1]
    run = sorted(set(wanted) | ({deepest} if distill else set()))
    hidden = model(input_ids, attention_mask=attention_mask, exits=run, return_hidden=True)
    out = {}
    for e in wanted:
        teacher = e in distill
        out[e] = exit_loss_sum(hidden[e], model.exit_head(e), labels, chunk_size,
                               hidden[deepest] if teacher else None,
                               model.exit_head(deepest) if teacher else None,
                               lambdas.get(e, 0.0), distill.get(e, 0.0), scale, eager=e == deepest)
    return out


def count_targets(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def total_objective(losses: dict[int, ExitLoss], total_targets: int) -> torch.Tensor:
    """sum_k lambda_k CE_k + mu_k KL_k over the step's global target count (exact under
    gradient accumulation and padding)."""
    return sum(loss.objective for loss in losses.values()) / max(total_targets, 1)
