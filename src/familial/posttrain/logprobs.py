"""Log-probabilities of chosen tokens through an LM head, chunk by chunk (never (tokens, vocab)).

GRPO needs log p(token) of each completion token under logits / temperature, with gradient.
Autograd through `log_softmax(h @ W.T)` would keep every chunk's (rows, vocab) logits for
backward: 39 GB for 64 x 1K tokens at vocabulary 151936. Here the forward keeps only the
(rows,) results and backward recomputes each chunk's logits (one more head matmul), as the
training exit losses (familial.train.losses) form theirs chunk by chunk. Softmax and sums run
in float32 whatever the activations' dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """(M,) log softmax(hidden @ weight.T / temperature)[targets] of rows `hidden` (M, H)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk):
        w = weight.to(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows] @ w.T).float().div_(temperature)          # (chunk, V)
            out[rows] = logits.gather(1, targets[rows, None])[:, 0] - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            g = grad[rows].float()
            # d logp / d logits = (onehot - softmax) / temperature, times the upstream gradient.
            grad_logits = torch.softmax((hidden[rows] @ w.T).float().div_(ctx.temperature), dim=-1)
            grad_logits.mul_(-g[:, None])
            grad_logits[torch.arange(g.shape[0], device=g.device), targets[rows]] += g
            grad_logits = grad_logits.div_(ctx.temperature).to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ w
            if need_weight:
                grad_weight += (grad_logits.T @ hidden[rows]).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _module_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    logits = head(hidden).float() / temperature
    return logits.gather(1, targets[:, None])[:, 0] - logits.logsumexp(-1)


def token_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """hidden (M, H) normed states, targets (M,) -> (M,) float32 log-probabilities of the
    targets under head(hidden) / temperature, differentiable in hidden and the head."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size = {chunk_size}: expected a positive integer")
    if type(head) is nn.Linear and head.bias is None:
        return _ChunkedTokenLogprobs.apply(hidden, head.weight, targets, float(temperature), chunk_size)
    # Any other head (a low-rank one after compression): the same chunking by recomputation.
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_module_logprobs, head, hidden[rows], targets[rows], temperature,
                                    use_reentrant=False))
        else:
            parts.append(_module_logprobs(head, hidden[rows], targets[rows], temperature))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
