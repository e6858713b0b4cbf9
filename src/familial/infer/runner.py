"""One batched forward pass over a family, each row branching off at its own exit.

The trunk runs once for the batch up to the deepest layer any row needs; at every exit the
rows that stop there (their member, or an adaptive row that is confident enough) run that
exit's branch, norm and head and leave the batch. So one decode step serves sequences of
different members and different lengths, and speculative verification can resume from the
hidden state a draft left at its exit (`start_layer`, `hidden`).

Adaptive rows that leave early supply the skipped layers' KV the CALM way: the trunk state
entering the exit (the input of trunk layer `exit`) is copied forward, and every skipped
layer (trunk layers exit..L-1 and the branches of deeper exits) gets K/V projected from it.
For trunk layer `exit` this is exactly its KV; deeper layers get an approximation, which is
what lets later tokens attend to this position without recomputing it. The projections of
all skipped layers run as one matmul (weights stacked on first use, a copy of the k/v
projections only: a few percent of the weights with grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from familial.infer.cache import CacheView, SlotCache
from familial.model import FamilyModel, LowRankLinear, rotate_half


@dataclass
class Row:
    slot: int
    # position of this call's first token (tokens before it are in the cache).
    start: int
    # the member's exit: the deepest exit this row may run to.
    exit: int
    # adaptive rows: decide(exit, last-position logits) -> stop here? Asked at each earlier exit.
    decide: Callable[[int, torch.Tensor], bool] | None = None
    # branches to run for their KV only (prefill for adaptive and speculative requests).
    extra_branches: frozenset[int] = frozenset()
    # keep running to the last layer even after `decide` chose an exit (exact prompt KV).
    full_kv: bool = False
    # trunk layer whose input hidden state (all positions) to return, for speculative drafts.
    keep_hidden: int | None = None
    # logits at every position (verification) instead of the last one only.
    all_logits: bool = False


@dataclass
class RowOutput:
    logits: torch.Tensor | None = None   # (T or 1, vocab)
    exit: int | None = None
    hidden: torch.Tensor | None = None   # (T, hidden) entering trunk layer `keep_hidden`


@dataclass
class _Active:
    """The rows still running, with their slices of everything a layer needs."""

    index: list[int]
    x: torch.Tensor
    view: CacheView
    rotary: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    decided: set[int] = field(default_factory=set)

    def select(self, keep: list[int]) -> "_Active":
        """Rows at positions `keep` (into self.index) as a new _Active."""
        if len(keep) == len(self.index):
            return self
        if not keep:
            return _Active([], self.x[:0], self.view, self.rotary, None, self.decided)
        at = torch.tensor(keep, dtype=torch.long, device=self.x.device)
        view = self.view.rows(keep)
        return _Active([self.index[i] for i in keep], self.x.index_select(0, at), view,
                       (self.rotary[0].index_select(0, at), self.rotary[1].index_select(0, at)),
                       view.mask(), self.decided)


class Runner:
    def __init__(self, model: FamilyModel, cache: SlotCache) -> None:
        self.model, self.cache, self.config = model, cache, model.config
        self.last = self.config.exits[-1]
        self.early = set(self.config.exits[:-1])
        self._stack = None

    @torch.inference_mode()
    def forward(self, rows: list[Row], tokens: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, start_layer: int = 0) -> list[RowOutput]:
        """tokens (B, T) from the embeddings, or hidden (B, T, H) entering `start_layer`."""
        model = self.model
        x = model.model.embed_tokens(tokens) if hidden is None else hidden
        length = x.shape[1]
        view = self.cache.view([r.slot for r in rows], [r.start for r in rows], length)
        rotary = model.rotary(view.positions, x.dtype)
        active = _Active(list(range(len(rows))), x, view, rotary, view.mask())
        outputs = [RowOutput() for _ in rows]
        for i in range(start_layer, self.config.num_hidden_layers):
            for j, b in enumerate(active.index):
                if rows[b].keep_hidden == i:
                    outputs[b].hidden = active.x[j]
            if i in self.early:
                active = self._exit_point(i, rows, active, outputs)
                if not active.index:
                    return outputs
            active.x = model.model.layers[str(i)](active.x, active.rotary, active.mask, active.view)
        finishing = [j for j, b in enumerate(active.index) if b not in active.decided]
        if finishing:
            done = active.select(finishing)
            self._finish(self.last, done.x, [rows[b] for b in done.index], done.index, outputs)
        return outputs

    def _exit_point(self, exit_layer: int, rows: list[Row], active: _Active,
                    outputs: list[RowOutput]) -> _Active:
        need = [j for j, b in enumerate(active.index)
                if rows[b].exit == exit_layer or exit_layer in rows[b].extra_branches
                or (rows[b].decide is not None and b not in active.decided and exit_layer < rows[b].exit)]
        if not need:
            return active
        sub = active.select(need)
        h = sub.x
        for layer in self.model.branch_layers(exit_layer):
            h = layer(h, sub.rotary, sub.mask, sub.view)
        heads = [j for j, b in enumerate(sub.index) if b not in active.decided and (
            rows[b].exit == exit_layer or rows[b].decide is not None)]
        leaving: set[int] = set()
        copy_forward: list[int] = []
        if heads:
            if len(heads) < len(sub.index):
                h = h.index_select(0, torch.tensor(heads, dtype=torch.long, device=h.device))
            self._finish(exit_layer, h, [rows[sub.index[j]] for j in heads],
                         [sub.index[j] for j in heads], outputs)
            for j in heads:
                b = sub.index[j]
                row = rows[b]
                if row.exit != exit_layer and not row.decide(exit_layer, outputs[b].logits[-1]):
                    outputs[b].logits = outputs[b].exit = None
                    continue
                if row.full_kv and row.exit != exit_layer:
                    active.decided.add(b)
                    continue
                leaving.add(b)
                if row.exit != exit_layer:
                    copy_forward.append(need[j])
        if copy_forward:
            self._copy_forward(exit_layer, active.select(copy_forward))
        if not leaving:
            return active
        return active.select([j for j, b in enumerate(active.index) if b not in leaving])

    def _finish(self, exit_layer: int, h: torch.Tensor, rows: list[Row], index: list[int],
                outputs: list[RowOutput]) -> None:
        if not any(r.all_logits for r in rows):
            h = h[:, -1:]
        logits = self.model.exit_head(exit_layer)(self.model.exit_norm(exit_layer)(h))
        for j, (b, row) in enumerate(zip(index, rows)):
            outputs[b].logits = logits[j] if row.all_logits else logits[j, -1:]
            outputs[b].exit = exit_layer

    def _copy_forward(self, exit_layer: int, rows: _Active) -> None:
        """CALM-style: write K/V of every layer these rows skip, projected from the exit state.

        All skipped layers' K and V come from one matmul: each layer's input RMSNorm weight
        is folded into its k/v projection, and the layers are stacked so that every exit's
        skipped set is a suffix of the stack (see `_projection`).
        """
        weight, bias, k_norm, layers = self._projection(exit_layer)
        batch, length, _ = rows.x.shape
        eps, dtype = self.config.rms_norm_eps, rows.x.dtype
        x = rows.x.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        # (B, T, layers, k|v, kv_heads, head_dim)
        kv = F.linear(x, weight, bias).view(batch, length, len(layers), 2, -1, self.config.head_dim)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]
        kf = k.float()
        k = k_norm * (kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        cos, sin = (t[:, :, None, None, :] for t in rows.rotary)
        k = k * cos + rotate_half(k) * sin
        for i, layer in enumerate(layers):
            rows.view.update(layer.cache_name, k[:, :, i].transpose(1, 2), v[:, :, i].transpose(1, 2))

    def _projection(self, exit_layer: int):
        """Stacked, norm-folded k/v projections of the layers skipped by exiting at `exit_layer`.

        Order: for each trunk layer i, the branch of exit i (if any) and then layer i, so the
        layers after exit e's branch are exactly those e skips (trunk e.., deeper branches).
        Built on first use, from the weights at that time.
        """
        if self._stack is None:
            order, starts = [], {}
            for i in range(self.config.num_hidden_layers):
                if i in self.early:
                    order += self.model.branch_layers(i)
                starts[i] = len(order)
                order.append(self.model.model.layers[str(i)])
            weights, biases = [], []
            for layer in order:
                gain = layer.input_layernorm.weight
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    dense = proj.dense_weight() if isinstance(proj, LowRankLinear) else proj.weight
                    weights.append(dense * gain[None, :])
                    biases.append(proj.bias if getattr(proj, "bias", None) is not None
                                  else torch.zeros(dense.shape[0], dtype=dense.dtype, device=dense.device))
            rows_per_layer = 2 * self.config.num_key_value_heads * self.config.head_dim
            self._stack = (torch.cat(weights), torch.cat(biases),
                           torch.stack([layer.self_attn.k_norm.weight for layer in order])[:, None, :],
                           order, starts, rows_per_layer)
        weight, bias, k_norm, order, starts, rows_per_layer = self._stack
        first = starts[exit_layer]
        return (weight[first * rows_per_layer:], bias[first * rows_per_layer:], k_norm[first:],
                order[first:])
