"""One packed forward pass over a family, each row branching off at its own exit.

Rows of any length (a decoding step's one token, a prompt chunk, drafted tokens to verify) are
laid end to end as one sequence (see familial.infer.cache), so every projection and MLP runs
once for the whole call. The trunk runs up to the deepest layer any row needs; at every exit
the rows that stop there (their member, or an adaptive row that is confident enough) run that
exit's branch, norm and head and leave. So one call serves sequences of different members,
lengths and phases, and speculative verification can resume from the hidden state a draft left
at its exit (`start_layer`, `hidden`).

Adaptive rows that leave early supply the skipped layers' KV the CALM way: the trunk state
entering the exit (the input of trunk layer `exit`) is copied forward, and every skipped
layer (trunk layers exit..L-1 and the branches of deeper exits) gets K/V projected from it.
For trunk layer `exit` this is exactly its KV; deeper layers get an approximation, which is
what lets later tokens attend to this position without recomputing it. The projections of
all skipped layers run as one matmul (weights stacked on first use, a copy of the k/v
projections only: a few percent of the weights with grouped-query attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from familial.infer.cache import CacheBatch, SlotCache
from familial.model import FamilyModel, LowRankLinear, rotate_half


@dataclass
class Row:
    slot: int
    # position of this call's first token (tokens before it are in the cache).
    start: int
    # the member's exit: the deepest exit this row may run to.
    exit: int
    # tokens (or hidden states) this row brings to the call.
    length: int = 1
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
    # False: the call only writes this row's KV (a prompt chunk before the last).
    logits: bool = True


@dataclass
class RowOutput:
    logits: torch.Tensor | None = None   # (T or 1, vocab)
    exit: int | None = None
    hidden: torch.Tensor | None = None   # (T, hidden) entering trunk layer `keep_hidden`


@dataclass
class _Active:
    """The rows still running, with their slices of everything a layer needs."""

    index: list[int]
    x: torch.Tensor                       # (1, N, hidden): the rows' tokens end to end
    batch: CacheBatch
    rotary: tuple[torch.Tensor, torch.Tensor]
    decided: set[int] = field(default_factory=set)

    def tokens(self, j: int) -> slice:
        return slice(self.batch.offsets[j], self.batch.offsets[j + 1])

    def select(self, keep: list[int]) -> _Active:
        """Rows at positions `keep` (into self.index) as a new _Active."""
        if len(keep) == len(self.index):
            return self
        offsets = self.batch.offsets
        at = torch.tensor([t for j in keep for t in range(offsets[j], offsets[j + 1])], dtype=torch.long,
                          device=self.x.device)
        return _Active([self.index[j] for j in keep], self.x.index_select(1, at), self.batch.rows(keep),
                       (self.rotary[0].index_select(1, at), self.rotary[1].index_select(1, at)),
                       self.decided)


class Runner:
    def __init__(self, model: FamilyModel, cache: SlotCache) -> None:
        self.model, self.cache, self.config = model, cache, model.config
        self.last = self.config.exits[-1]
        self.early = set(self.config.exits[:-1])
        self._stack = None

    @torch.inference_mode()
    def forward(self, rows: list[Row], tokens: torch.Tensor | list[int] | None = None,
                hidden: torch.Tensor | None = None, start_layer: int = 0) -> list[RowOutput]:
        """tokens (N,) from the embeddings, or hidden (N, H) entering `start_layer`, where N is
        the rows' lengths summed: row i's inputs follow row i-1's."""
        model = self.model
        if hidden is None:
            tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.cache.device)
            x = model.model.embed_tokens(tokens)[None]
        else:
            x = hidden[None]
        if x.shape[1] != sum(r.length for r in rows):
            raise ValueError(f"{x.shape[1]} inputs for rows of {sum(r.length for r in rows)} tokens")
        batch = self.cache.batch([r.slot for r in rows], [r.start for r in rows], [r.length for r in rows])
        rotary = model.rotary(batch.positions[None], x.dtype)
        active = _Active(list(range(len(rows))), x, batch, rotary)
        outputs = [RowOutput() for _ in rows]
        keep = {r.keep_hidden for r in rows}
        for i in range(start_layer, self.config.num_hidden_layers):
            if i in keep:
                for j, b in enumerate(active.index):
                    if rows[b].keep_hidden == i:
                        outputs[b].hidden = active.x[0, active.tokens(j)]
            if i in self.early:
                active = self._exit_point(i, rows, active, outputs)
                if not active.index:
                    return outputs
            active.x = model.model.layers[str(i)](active.x, active.rotary, None, active.batch)
        finishing = [j for j, b in enumerate(active.index) if b not in active.decided]
        if finishing:
            done = active.select(finishing)
            self._finish(self.last, done, rows, outputs)
        return outputs

    def _exit_point(self, exit_layer: int, rows: list[Row], active: _Active,
                    outputs: list[RowOutput]) -> _Active:
        need = [j for j, b in enumerate(active.index)
                if rows[b].exit == exit_layer or exit_layer in rows[b].extra_branches
                or (rows[b].decide is not None and b not in active.decided and exit_layer < rows[b].exit)]
        if not need:
            return active
        sub = active.select(need)
        branch = _Active(sub.index, sub.x, sub.batch, sub.rotary)
        for layer in self.model.branch_layers(exit_layer):
            branch.x = layer(branch.x, branch.rotary, None, branch.batch)
        heads = [j for j, b in enumerate(sub.index) if b not in active.decided and (
            rows[b].exit == exit_layer or rows[b].decide is not None)]
        leaving: set[int] = set()
        copy_forward: list[int] = []
        if heads:
            self._finish(exit_layer, branch.select(heads), rows, outputs)
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

    def _finish(self, exit_layer: int, done: _Active, rows: list[Row], outputs: list[RowOutput]) -> None:
        """Norm and head at the positions each row wants logits for."""
        picks, counts = [], []
        for j, b in enumerate(done.index):
            span = done.tokens(j)
            wanted = (range(span.start, span.stop) if rows[b].all_logits
                      else [span.stop - 1] if rows[b].logits or rows[b].decide is not None else [])
            picks += wanted
            counts.append(len(wanted))
            outputs[b].exit = exit_layer
        if not picks:
            return
        at = torch.tensor(picks, dtype=torch.long, device=done.x.device)
        h = done.x[0].index_select(0, at)
        logits = self.model.exit_head(exit_layer)(self.model.exit_norm(exit_layer)(h))
        begin = 0
        for b, count in zip(done.index, counts):
            if count:
                outputs[b].logits = logits[begin:begin + count]
            begin += count

    def _copy_forward(self, exit_layer: int, rows: _Active) -> None:
        """CALM-style: write K/V of every layer these rows skip, projected from the exit state.

        All skipped layers' K and V come from one matmul: each layer's input RMSNorm weight
        is folded into its k/v projection, and the layers are stacked so that every exit's
        skipped set is a suffix of the stack (see `_projection`).
        """
        weight, bias, k_norm, layers = self._projection(exit_layer)
        _, length, _ = rows.x.shape
        eps, dtype = self.config.rms_norm_eps, rows.x.dtype
        x = rows.x.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        # (1, N, layers, k|v, kv_heads, head_dim)
        kv = F.linear(x, weight, bias).view(1, length, len(layers), 2, -1, self.config.head_dim)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]
        kf = k.float()
        k = k_norm * (kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        cos, sin = (t[:, :, None, None, :] for t in rows.rotary)
        k = k * cos + rotate_half(k) * sin
        for i, layer in enumerate(layers):
            rows.batch.write(layer.cache_name, k[:, :, i].transpose(1, 2), v[:, :, i].transpose(1, 2))

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
