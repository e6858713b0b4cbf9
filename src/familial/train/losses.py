"""The multi-exit objective: per-exit cross-entropy (and optional self-distillation), chunked.

    L_total(t) = sum_k lambda_k(t) * CE_k  +  sum_k mu_k(t) * KL(p_deepest || q_k)

Every term is a SUM over target tokens; the caller divides by the number of target tokens
of the whole optimizer step (all micro-batches, all ranks), so the result is exact under
gradient accumulation and padding. A head is applied chunk by chunk and the chunk's logits
are recomputed in backward, so no exit ever holds its full (tokens, vocab) logits: peak
memory with K exits stays close to one exit's, even at a 150k vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024


class _ChunkedLinearLoss(torch.autograd.Function):
    """(ce_sum, kd_sum) of rows `hidden` (M, H) through a bias-free head `weight` (V, H).

    kd_sum is KL(softmax(teacher_hidden @ teacher_weight.T) || softmax(hidden @ weight.T))
    summed over rows (zero without a teacher). Only the inputs are saved; backward recomputes
    each chunk's logits, so memory is one chunk of (chunk, V) at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, teacher_hidden, teacher_weight):
        ce_sum = hidden.new_zeros((), dtype=_loss_dtype(hidden.dtype))
        kd_sum = torch.zeros_like(ce_sum)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_q = _log_probs(hidden[rows], weight)
            ce_sum += -log_q.gather(1, targets[rows, None]).sum()
            if teacher_hidden is not None:
                log_p = _log_probs(teacher_hidden[rows], teacher_weight)
                kd_sum += (log_p.exp() * (log_p - log_q)).sum()
        ctx.save_for_backward(hidden, weight, targets, teacher_hidden, teacher_weight)
        ctx.chunk = chunk
        return ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_ce, grad_kd):
        hidden, weight, targets, teacher_hidden, teacher_weight = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=_loss_dtype(weight.dtype)) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            q = _log_probs(hidden[rows], weight).exp()
            # d CE / d logits = q - onehot(target); d KL(p||q) / d logits = q - p.
            grad_logits = q * grad_ce
            grad_logits[torch.arange(q.shape[0], device=q.device), targets[rows]] -= grad_ce
            if teacher_hidden is not None:
                p = _log_probs(teacher_hidden[rows], teacher_weight).exp()
                grad_logits += (q - p) * grad_kd
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight.to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.T @ hidden[rows]
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax and sums in at least float32 (as HF does for bf16 logits).
    return torch.promote_types(dtype, torch.float32)


def _log_probs(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # (chunk, H) @ (H, V) in the activations' dtype.
    logits = hidden @ weight.to(hidden.dtype).T
    return torch.log_softmax(logits.to(_loss_dtype(logits.dtype)), dim=-1)


def _module_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 teacher: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden)
    log_q = torch.log_softmax(logits.to(_loss_dtype(logits.dtype)), dim=-1)
    ce = -log_q.gather(1, targets[:, None]).sum()
    if teacher is None:
        return ce, ce.new_zeros(())
    return ce, (teacher.exp() * (teacher - log_q)).sum()


@dataclass
class ExitLoss:
    ce_sum: torch.Tensor     # sum of token cross-entropies (scalar, at least float32)
    kd_sum: torch.Tensor     # sum of token KL(teacher || this exit); zero without a teacher
    count: int               # target tokens the sums cover


def exit_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                  chunk_size: int = DEFAULT_CHUNK, teacher_hidden: torch.Tensor | None = None,
                  teacher_head: nn.Module | None = None) -> ExitLoss:
    """Token-loss sums of one exit from its normed hidden state (B, T, H) and its head.

    labels (B, T) are already shifted; IGNORE_INDEX marks positions without a target. With a
    teacher (the deepest exit's hidden state and head), the KL term is computed too; the
    teacher is always detached. Usable on its own by a pipeline stage holding one exit.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size = {chunk_size}: expected a positive integer")
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    rows, targets = flat.index_select(0, keep), labels.reshape(-1).index_select(0, keep)
    teacher_rows = None
    if teacher_hidden is not None:
        if teacher_head is None:
            raise ValueError("a teacher hidden state needs its head (teacher_head)")
        teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, keep)
    if _is_plain_linear(head) and (teacher_head is None or _is_plain_linear(teacher_head)):
        teacher_weight = None if teacher_head is None else teacher_head.weight.detach()
        ce, kd = _ChunkedLinearLoss.apply(rows, head.weight, targets, chunk_size,
                                          teacher_rows, teacher_weight)
        return ExitLoss(ce, kd, int(keep.numel()))
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
    return ExitLoss(ce, kd, int(keep.numel()))


def _is_plain_linear(head: nn.Module) -> bool:
    return type(head) is nn.Linear and head.bias is None


def family_loss_sums(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     exits: list[int] | None = None, chunk_size: int = DEFAULT_CHUNK,
                     distill: set[int] | frozenset[int] = frozenset(),
                     attention_mask: torch.Tensor | None = None) -> dict[int, ExitLoss]:
    """One trunk pass of a FamilyModel -> {exit: ExitLoss} for every requested exit.

    Exits in `distill` also get the KL term against the deepest exit (the last one).
    """
    config = model.config
    wanted = sorted(exits or config.exits)
    deepest = config.exits[-1]
    run = sorted(set(wanted) | ({deepest} if distill else set()))
    hidden = model(input_ids, attention_mask=attention_mask, exits=run, return_hidden=True)
    out = {}
    for e in wanted:
        teacher = e in distill and e != deepest
        out[e] = exit_loss_sum(hidden[e], model.exit_head(e), labels, chunk_size,
                               hidden[deepest] if teacher else None,
                               model.exit_head(deepest) if teacher else None)
    return out


def count_targets(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def weighted_loss(losses: dict[int, ExitLoss], lambdas: dict[int, float],
                  distill_weights: dict[int, float], total_targets: int) -> torch.Tensor:
    """sum_k lambda_k CE_k + mu_k KL_k, normalised by the step's global target count."""
    total = None
    for e, loss in losses.items():
        term = loss.ce_sum * lambdas.get(e, 0.0)
        if distill_weights.get(e, 0.0):
            term = term + loss.kd_sum * distill_weights[e]
        total = term if total is None else total + term
    return total / max(total_targets, 1)


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from full logits, for checking against the chunked path."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)
