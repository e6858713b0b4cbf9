"""One packed forward pass over a family, each row branching off at its own exit.

Rows of any length (a decoding step's one token, a prompt chunk, drafted tokens to verify) are
laid end to end as one sequence (see familial.infer.cache), so every projection and MLP runs
once for the whole call. The trunk runs up to the deepest layer any row needs; at every exit
the rows that stop there (their member, or an adaptive row that is confident enough) run that
exit's branch, norm and head and leave. So one call serves sequences of different members,
lengths and phases, and speculative verification can resume from the hidden state a draft left
at its exit (`start_layer`, `hidden`).

Adaptive rows (familial.infer.adaptive) decide at each early exit whether their token leaves,
and they leave together: at an exit where every row still running is either done there (its
member's or its budget's exit) or an adaptive row deciding, and every deciding row's token may
leave. A decoding step's layer costs about the same for one row as for all of them (the weights
are read once either way), so a row leaving while another goes on saves nothing and costs its
own branch, head and a split of the batch, and later a second pass over its skipped layers.
So a token whose measure says "leave" beside one that says "go on" goes on, and takes the token
of the exit where the batch leaves; the rule is checked measure by measure and stops at the
first "go on", and with calibrated leave rates a batch checks an exit only where all of its
rows may well leave (familial.infer.adaptive), so a batch that cannot leave pays for no
scores. Alone, a row leaves at its own first confident exit. Rows that must stop (a fixed
member's exit, a budget's cap) still leave alone, and prompt rows keep running for their KV
after their token's exit is decided.
What adaptive positions lack is filled as late and as cheaply as it can be:
- Branch KV, lazily. At every early exit an adaptive row passes, its tokens' trunk states go to
  the cache's exit-state buffer (one write). When a token leaves at an exit, or a softmax
  measure runs the exit's branch, the branch runs over every position since it last ran, from
  those states. So a token that passes an exit pays for no branch layer.
- The skipped layers' KV, one of two ways:
  recompute (`Adaptive.pending` is a list; exact): positions that left early wait, each with
  the exit where its KV stops (its frontier). The next pass that goes past a frontier takes
  those positions along: their stored state joins the row there, and they run with it as deep
  as it goes. Frontiers never increase with position, so a row stays one contiguous span. The
  extra positions cost little next to the pass itself (the weights are read once either way),
  and every layer's KV is what recomputing the whole sequence from scratch gives.
  copy (`pending` is None; CALM): the state entering the exit is copied forward. Every skipped
  trunk layer gets K/V projected from it (exact for trunk layer `exit`, an approximation
  deeper), in one matmul (norm-folded k/v weights of the trunk stacked on first use, a few
  percent of the weights with grouped-query attention), and deeper exits' branches read it as
  their state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from familial.infer.adaptive import SOFTMAX, ExitClassifier, ExitRule, log_odds, saturation, softmax_score
from familial.infer.cache import CacheBatch, SlotCache
from familial.model import FamilyModel, LowRankLinear, rotate_half


@dataclass
class Adaptive:
    """An adaptive row: its rule and the state of its earlier positions (AdaptiveState)."""

    rule: ExitRule
    # the deepest exit the token may leave at this step (the member, or a budget's cap).
    cap: int
    # first position lacking each branch's KV, for every early exit up to the member's.
    branch_from: dict[int, int]
    # recompute: (first position, frontier exit) groups waiting for deeper KV; None: copy.
    pending: list[tuple[int, int]] | None = None
    classifier: ExitClassifier | None = None
    # False: a prompt chunk before the last (its states are kept, nothing is decided).
    decide: bool = True


@dataclass
class Row:
    slot: int
    # position of this call's first token (tokens before it are in the cache).
    start: int
    # the member's exit: the deepest exit this row may run to.
    exit: int
    # tokens (or hidden states) this row brings to the call.
    length: int = 1
    # adaptive rows: where and how the last token may leave early.
    adaptive: Adaptive | None = None
    # branches to run for their KV only (prefill of speculative requests, KV catch-up).
    extra_branches: frozenset[int] = frozenset()
    # keep running to the member's exit after the token's exit is decided (exact prompt KV).
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
    # adaptive rows: exits whose branch ran over every position up to this row's last.
    branches: set[int] = field(default_factory=set)


@dataclass
class _Active:
    """The rows still running, with their slices of everything a layer needs."""

    index: list[int]
    x: torch.Tensor                       # (1, N, hidden): the rows' tokens end to end
    batch: CacheBatch
    rotary: tuple[torch.Tensor, torch.Tensor]
    decided: set[int] = field(default_factory=set)
    # (rows, hidden): each row's last token at the previous exit (saturation measure only).
    previous: torch.Tensor | None = None
    # the call's token ids while x holds their embeddings (before any layer, join or split).
    inputs: torch.Tensor | list[int] | None = None

    def tokens(self, j: int) -> slice:
        return slice(self.batch.offsets[j], self.batch.offsets[j + 1])

    def last(self, js: list[int]) -> torch.Tensor:
        """(len(js), hidden): the last token of rows js."""
        at = [self.batch.offsets[j + 1] - 1 for j in js]
        if at == list(range(at[0], at[0] + len(at))):
            # Single-token rows side by side (a decoding step): a view, no gather.
            return self.x[0, at[0]:at[0] + len(at)]
        return self.x[0, at]

    def select(self, keep: list[int]) -> _Active:
        """Rows at positions `keep` (into self.index) as a new _Active."""
        if len(keep) == len(self.index):
            return self
        if not keep:
            return _Active([], self.x[:, :0], self.batch, self.rotary, self.decided)
        offsets = self.batch.offsets
        at = torch.tensor([t for j in keep for t in range(offsets[j], offsets[j + 1])], dtype=torch.long,
                          device=self.x.device)
        previous = None if self.previous is None else self.previous[keep]
        return _Active([self.index[j] for j in keep], self.x.index_select(1, at), self.batch.rows(keep),
                       (self.rotary[0].index_select(1, at), self.rotary[1].index_select(1, at)),
                       self.decided, previous)


class Runner:
    def __init__(self, model: FamilyModel, cache: SlotCache) -> None:
        self.model, self.cache, self.config = model, cache, model.config
        self.last = self.config.exits[-1]
        self.early = set(self.config.exits[:-1])
        self._stack = None
        self._table = None
        self._embedding_scores = None

    @torch.inference_mode()
    def forward(self, rows: list[Row], tokens: torch.Tensor | list[int] | None = None,
                hidden: torch.Tensor | None = None, start_layer: int = 0) -> list[RowOutput]:
        """tokens (N,) from the embeddings, or hidden (N, H) entering `start_layer`, where N is
        the rows' lengths summed: row i's inputs follow row i-1's."""
        model = self.model
        inputs = None
        if hidden is None:
            inputs = tokens
            tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.cache.device)
            x = model.model.embed_tokens(tokens)[None]
        else:
            x = hidden[None]
        if x.shape[1] != sum(r.length for r in rows):
            raise ValueError(f"{x.shape[1]} inputs for rows of {sum(r.length for r in rows)} tokens")
        batch = self.cache.batch([r.slot for r in rows], [r.start for r in rows], [r.length for r in rows])
        active = _Active(list(range(len(rows))), x, batch, self._rotary(batch, x.dtype),
                         inputs=inputs if start_layer == 0 else None)
        if any(r.adaptive is not None and r.adaptive.rule.measure == "saturation" for r in rows):
            active.previous = active.last(list(range(len(rows))))
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
            self._finish(self.last, done.x[0], done.batch.offsets, done.index, rows, outputs)
        return outputs

    def _rotary(self, batch: CacheBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's (cos, sin), read from a table of every cache position (built on first use):
        a decoding step's rotary is then a view, not a handful of kernels per pass and branch."""
        if self._table is None or self._table[0].dtype != dtype:
            positions = torch.arange(self.cache.max_len, device=self.cache.device)[None]
            self._table = self.model.rotary(positions, dtype)
        return batch.rotary(self._table)

    def _exit_point(self, exit_layer: int, rows: list[Row], active: _Active,
                    outputs: list[RowOutput]) -> _Active:
        """Rows that stop at this exit leave (branch, norm, head); adaptive rows keep their
        states, decide, and take pending positions along."""
        passing = [j for j, b in enumerate(active.index)
                   if rows[b].adaptive is not None and exit_layer in rows[b].adaptive.branch_from]
        if passing:
            self._store_states(exit_layer, active, passing)
        leaving, branch_only, deciding, dropping = [], [], [], []
        for j, b in enumerate(active.index):
            row, info = rows[b], rows[b].adaptive
            if info is None:
                if row.exit == exit_layer:
                    leaving.append(j)
                elif exit_layer in row.extra_branches:
                    branch_only.append(j)
            elif b in active.decided or not info.decide:
                if row.exit == exit_layer:
                    dropping.append(j)   # prompt KV done; its branch KV is filled lazily
            elif info.cap == exit_layer:
                leaving.append(j)
            elif exit_layer < info.cap and info.rule.enabled(exit_layer):
                deciding.append(j)
        ran: set[int] = set()
        # Adaptive rows leave together or not at all: only when no row goes deeper does
        # leaving save a layer (see the module docstring).
        if deciding and len(leaving) + len(dropping) + len(deciding) == len(active.index) \
                and self._worth_checking(exit_layer, rows, active, deciding) \
                and self._confident(exit_layer, rows, active, deciding, outputs):
            ran = {j for j in deciding if rows[active.index[j]].adaptive.rule.measure in SOFTMAX}
            leaving = sorted(leaving + deciding)
        if active.previous is not None:
            active.previous = active.last(list(range(len(active.index))))
        heads = [j for j in leaving if j not in ran]
        if heads or branch_only:
            if heads == list(range(len(active.index))) and all(rows[b].adaptive is None for b in active.index):
                h, offsets = self._run_branch(exit_layer, active), active.batch.offsets
                self._finish(exit_layer, h, offsets, active.index, rows, outputs)
            else:
                h, offsets = self._branch(exit_layer, rows, active, heads + branch_only, outputs)
                self._finish(exit_layer, h, offsets[:len(heads) + 1], [active.index[j] for j in heads], rows,
                             outputs)
        copying = [j for j in leaving if rows[active.index[j]].adaptive is not None
                   and rows[active.index[j]].adaptive.pending is None
                   and not rows[active.index[j]].full_kv and exit_layer != rows[active.index[j]].exit]
        if copying:
            self._copy_forward(exit_layer, rows, active.select(copying))
        gone = set(dropping)
        for j in leaving:
            b = active.index[j]
            if rows[b].full_kv and rows[b].exit != exit_layer:
                active.decided.add(b)
            else:
                gone.add(j)
        if gone:
            active = active.select([j for j in range(len(active.index)) if j not in gone])
        joining = {}
        for j, b in enumerate(active.index):
            info = rows[b].adaptive
            if info is not None and info.pending and b not in active.decided:
                joining.update((j, p) for p, f in info.pending if f == exit_layer)
        return self._join(exit_layer, active, joining) if joining else active

    def _worth_checking(self, exit_layer: int, rows: list[Row], active: _Active, deciding: list[int]) -> bool:
        """Whether checking several rows here can pay: the chance that all of them leave (their
        rules' calibrated leave rates multiplied) times the layers leaving saves, against the
        check's cost. A lone row checks wherever its rule does, as calibrated."""
        if len(deciding) == 1:
            return True
        chance, cost, deepest = 1.0, 0.0, exit_layer
        for j in deciding:
            info = rows[active.index[j]].adaptive
            if info.rule.leave is None:
                return True
            chance *= info.rule.leave.get(exit_layer, 0.0)
            cost = max(cost, info.rule.check_cost(self.config, exit_layer))
            deepest = max(deepest, info.cap)
        saved = self.config.member_layers(deepest) - self.config.member_layers(exit_layer)
        return chance * saved > cost

    def _confident(self, exit_layer: int, rows: list[Row], active: _Active, deciding: list[int],
                   outputs: list[RowOutput]) -> bool:
        """Whether every deciding row's token may leave here. Stops at the first measure that
        says no; softmax measures leave their logits in `outputs` when it says yes."""
        states = active.last(deciding)
        groups: dict[str, list[int]] = {}
        for i, j in enumerate(deciding):
            groups.setdefault(rows[active.index[j]].adaptive.rule.measure, []).append(i)
        for measure, group in groups.items():
            js = [deciding[i] for i in group]
            infos = [rows[active.index[j]].adaptive for j in js]
            mine = states if len(group) == len(deciding) else states[group]
            classifier = infos[0].classifier
            if measure in SOFTMAX and any(info.rule.screen is not None for info in infos):
                hope = classifier.log_odds(exit_layer, mine)
                if any(info.rule.screen is not None and h < log_odds(info.rule.screen[exit_layer])
                       for info, h in zip(infos, hope)):
                    return self._stay(active, deciding, outputs)
            if measure == "classifier":
                # Log-odds against the thresholds' log-odds: the same test without a sigmoid.
                if exit_layer == 0 and active.inputs is not None:
                    # The state entering exit 0 is the token's embedding: its score is the token's.
                    table = self._embedding_log_odds(classifier)
                    scores = [table[int(active.inputs[active.batch.offsets[j + 1] - 1])] for j in js]
                else:
                    scores = classifier.log_odds(exit_layer, mine)
                limits = [log_odds(info.rule.thresholds[exit_layer]) for info in infos]
            else:
                if measure == "saturation":
                    scores = saturation(mine, active.previous[js]).tolist()
                else:
                    h, offsets = self._branch(exit_layer, rows, active, js, outputs)
                    indices = [active.index[j] for j in js]
                    self._finish(exit_layer, h, offsets, indices, rows, outputs)
                    scores = softmax_score(torch.cat([outputs[b].logits[-1:] for b in indices]), measure).tolist()
                limits = [info.rule.thresholds[exit_layer] for info in infos]
            if any(score < limit for score, limit in zip(scores, limits)):
                return self._stay(active, deciding, outputs)
        return True

    def _embedding_log_odds(self, classifier: ExitClassifier) -> list[float]:
        """Exit 0's classifier log-odds of every token id (its state is the token's embedding),
        computed on first use: a check there is a lookup."""
        if self._embedding_scores is None or self._embedding_scores[0] is not classifier:
            with torch.inference_mode():
                scores = classifier.logit(0, self.model.model.embed_tokens.weight).tolist()
            self._embedding_scores = (classifier, scores)
        return self._embedding_scores[1]

    @staticmethod
    def _stay(active: _Active, deciding: list[int], outputs: list[RowOutput]) -> bool:
        """The batch goes on: drop the logits a softmax check left (the branch KV it wrote stays)."""
        for j in deciding:
            out = outputs[active.index[j]]
            out.logits = out.exit = None
        return False

    def _store_states(self, exit_layer: int, active: _Active, js: list[int]) -> None:
        """Keep the trunk states entering `exit_layer` of rows js' tokens (the exit-state buffer)."""
        buffer, batch = self.cache.states(exit_layer), active.batch
        if len(js) == 1:
            j = js[0]
            buffer[batch.slots[j], batch.starts[j]:batch.starts[j] + batch.lengths[j]] = active.x[0, active.tokens(j)]
            return
        if len(js) == len(batch.slots):
            # Every row: the call's own cache indices.
            buffer[batch.slice or (batch.slot_index, batch.positions)] = active.x[0]
            return
        slots = [batch.slots[j] for j in js for _ in range(batch.lengths[j])]
        positions = [p for j in js for p in range(batch.starts[j], batch.starts[j] + batch.lengths[j])]
        device = active.x.device
        x = active.x[0]
        if len(positions) != batch.tokens:
            x = x[torch.tensor([t for j in js for t in range(batch.offsets[j], batch.offsets[j + 1])],
                               device=device)]
        buffer[torch.tensor(slots, device=device), torch.tensor(positions, device=device)] = x

    def _run_branch(self, exit_layer: int, active: _Active) -> torch.Tensor:
        x = active.x
        for layer in self.model.branch_layers(exit_layer):
            x = layer(x, active.rotary, None, active.batch)
        return x[0]

    def _branch(self, exit_layer: int, rows: list[Row], active: _Active, js: list[int],
                outputs: list[RowOutput]) -> tuple[torch.Tensor, list[int]]:
        """Exit `exit_layer`'s branch for rows js, in one packed call: (N, hidden) and each row's
        offsets. An adaptive row runs over every position since the branch last ran, from the
        stored states (those positions' branch KV is written on the way)."""
        pieces, slots, starts = [], [], []
        for j in js:
            b = active.index[j]
            info, slot, start = rows[b].adaptive, active.batch.slots[j], active.batch.starts[j]
            if info is None:
                pieces.append(active.x[0, active.tokens(j)])
            else:
                first = info.branch_from[exit_layer]
                pieces.append(self.cache.states(exit_layer)[slot, first:start + active.batch.lengths[j]])
                start = first
                outputs[b].branches.add(exit_layer)
            slots.append(slot)
            starts.append(start)
        batch = self.cache.batch(slots, starts, [len(p) for p in pieces])
        x = (torch.cat(pieces) if len(pieces) > 1 else pieces[0])[None]
        branch = _Active(js, x, batch, self._rotary(batch, x.dtype))
        return self._run_branch(exit_layer, branch), batch.offsets

    def _finish(self, exit_layer: int, h: torch.Tensor, offsets: list[int], index: list[int], rows: list[Row],
                outputs: list[RowOutput]) -> None:
        """Norm and head at the positions each row wants logits for; h (N, hidden) holds row
        index[i]'s tokens at offsets[i]:offsets[i + 1]."""
        picks, counts = [], []
        for i, b in enumerate(index):
            begin, end = offsets[i], offsets[i + 1]
            wanted = range(begin, end) if rows[b].all_logits else [end - 1] if rows[b].logits else []
            picks += wanted
            counts.append(len(wanted))
            outputs[b].exit = exit_layer
        if not picks:
            return
        if len(picks) < h.shape[0]:
            h = h[picks[0]:picks[0] + 1] if len(picks) == 1 else h[picks]
        logits = self.model.exit_head(exit_layer)(self.model.exit_norm(exit_layer)(h))
        begin = 0
        for b, count in zip(index, counts):
            if count:
                outputs[b].logits = logits[begin:begin + count]
            begin += count

    def _join(self, exit_layer: int, active: _Active, joining: dict[int, int]) -> _Active:
        """Rows j in `joining` take their pending positions from joining[j] on along from here:
        the stored states of those positions go in front of the row's tokens. The row's own
        tokens were stored at this exit too (`_store_states`), so the joined row is one slice
        of the exit-state buffer."""
        buffer, batch = self.cache.states(exit_layer), active.batch
        pieces, starts = [], []
        for j in range(len(active.index)):
            x, start = active.x[0, active.tokens(j)], batch.starts[j]
            if j in joining:
                start = joining[j]
                x = buffer[batch.slots[j], start:batch.starts[j] + batch.lengths[j]]
            pieces.append(x)
            starts.append(start)
        joined = self.cache.batch(batch.slots, starts, [len(p) for p in pieces])
        x = (torch.cat(pieces) if len(pieces) > 1 else pieces[0])[None]
        return _Active(active.index, x, joined, self._rotary(joined, x.dtype),
                       active.decided, active.previous)

    def _copy_forward(self, exit_layer: int, rows: list[Row], leaving: _Active) -> None:
        """CALM-style: K/V of every trunk layer these rows skip, projected from the exit state,
        and that state as the state of every deeper exit (whose branches read it lazily).

        All skipped trunk layers' K and V come from one matmul: each layer's input RMSNorm
        weight is folded into its k/v projection, and the layers are stacked in order.
        """
        stops: dict[int, list[int]] = {}
        for j, b in enumerate(leaving.index):
            member = rows[b].exit
            stops.setdefault(self.config.num_hidden_layers if member == self.last else member, []).append(j)
        for stop, js in stops.items():
            rows_ = leaving.select(js)
            weight, bias, k_norm, layers = self._projection(exit_layer, stop)
            _, length, _ = rows_.x.shape
            eps, dtype = self.config.rms_norm_eps, rows_.x.dtype
            x = rows_.x.float()
            x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
            # (1, N, layers, k|v, kv_heads, head_dim)
            kv = F.linear(x, weight, bias).view(1, length, len(layers), 2, -1, self.config.head_dim)
            k, v = kv[:, :, :, 0], kv[:, :, :, 1]
            if k_norm is not None:  # Qwen3's per-head key norm (Llama has none)
                kf = k.float()
                k = k_norm * (kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
            cos, sin = (t[:, :, None, None, :] for t in rows_.rotary)
            k = k * cos + rotate_half(k) * sin
            for i, layer in enumerate(layers):
                rows_.batch.write(layer.cache_name, k[:, :, i].transpose(1, 2), v[:, :, i].transpose(1, 2))
            for deeper in sorted(self.early):
                if exit_layer < deeper <= stop:
                    self._store_states(deeper, rows_, list(range(len(rows_.index))))

    def _projection(self, exit_layer: int, stop: int):
        """Stacked, norm-folded k/v projections of trunk layers exit_layer..stop-1 (built on
        first use, from the weights at that time)."""
        if self._stack is None:
            layers = [self.model.model.layers[str(i)] for i in range(self.config.num_hidden_layers)]
            weights, biases = [], []
            for layer in layers:
                gain = layer.input_layernorm.weight
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    dense = proj.dense_weight() if isinstance(proj, LowRankLinear) else proj.weight
                    weights.append(dense * gain[None, :])
                    biases.append(proj.bias if getattr(proj, "bias", None) is not None
                                  else torch.zeros(dense.shape[0], dtype=dense.dtype, device=dense.device))
            rows_per_layer = 2 * self.config.num_key_value_heads * self.config.head_dim
            k_norms = (torch.stack([layer.self_attn.k_norm.weight for layer in layers])[:, None, :]
                       if self.config.qk_norm else None)
            self._stack = (torch.cat(weights), torch.cat(biases), k_norms, layers, rows_per_layer)
        weight, bias, k_norm, layers, per = self._stack
        return (weight[exit_layer * per:stop * per], bias[exit_layer * per:stop * per],
                None if k_norm is None else k_norm[exit_layer:stop], layers[exit_layer:stop])
