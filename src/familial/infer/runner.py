"""One packed forward pass over a family, each row branching off at its own exit.

Invariants a change here must keep (each has tests in tests/infer):
- One call, one pass: rows of any length (a decoding step's token, a prompt chunk, drafted
  tokens to verify) lie end to end as one sequence (familial.infer.cache), so every projection
  runs once per call, and the trunk runs only as deep as the deepest row needs.
- Rows that must stop at an exit (their member's, their budget's cap) leave there alone;
  speculative verification resumes from the state a draft left at its exit (`start_layer`,
  `hidden`); prompt rows keep running for their KV after their token's exit is decided.
- Adaptive rows (familial.infer.adaptive) leave together or not at all: at an exit where every
  row still running is done there or is deciding, and every deciding token may leave. A layer
  costs a decoding step about the same for one row as for all (the weights are read once), so a
  "go on" anywhere keeps every deciding row going, with the token of the exit where the batch
  leaves; the rule stops at the first "go on", and calibrated leave rates skip the check where
  the batch cannot leave. Alone, a row leaves at its own first confident exit.
- A token that passes an exit pays for no branch layer: its trunk state goes to the cache's
  exit-state buffer, and the branch runs over every position since it last ran only when a
  token leaves there or a softmax measure needs the branch (lazy branch KV).
- Skipped trunk layers' KV, one of two ways. Recompute (`Adaptive.pending` is a list; exact):
  positions that left early wait with their frontier (the exit where their KV stops); the next
  pass past a frontier takes them along from their stored state. Frontiers never increase with
  position, so a row stays one contiguous span, and every layer's KV equals recomputing the
  sequence from scratch. Copy (`pending` is None; CALM): the state entering the exit is copied
  forward and every skipped layer's K/V is projected from it in one matmul (exact for trunk
  layer `exit` only; norm-folded k/v weights stacked on first use and rebuilt when the weights
  change).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from familial.infer.adaptive import SOFTMAX, ExitClassifier, ExitRule, log_odds, saturation, softmax_score
from familial.infer.cache import CacheBatch, SlotCache
from familial.infer.kernels import Kernels, Packs
from familial.model import FamilyModel, LowRankLinear, apply_rotary, rms_norm


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


@dataclass
class _Groups:
    """What the running rows (positions into _Active.index) do at one exit."""

    # leave here: branch, norm and head (a fixed member's exit, a budget's cap, a confident batch).
    leaving: list[int] = field(default_factory=list)
    # run this exit's branch for its KV only.
    branch_only: list[int] = field(default_factory=list)
    # adaptive rows that may leave here if the whole batch can.
    deciding: list[int] = field(default_factory=list)
    # adaptive rows whose token's exit is decided and whose prompt KV ends here.
    dropping: list[int] = field(default_factory=list)


class Runner:
    def __init__(self, model: FamilyModel, cache: SlotCache, kernels: str = "auto") -> None:
        self.model, self.cache, self.config = model, cache, model.config
        # Layers and heads on packed kernels where the device has them (familial.infer.kernels).
        self.kernels = Kernels(model, kernels)
        self.last = self.config.exits[-1]
        self.early = set(self.config.exits[:-1])
        # Values derived from the weights (the copy-forward K/V stack), rebuilt when they change.
        self._derived = Packs()
        self._table = None
        self._embedding_scores = None

    @torch.inference_mode()
    def forward(self, rows: list[Row], tokens: torch.Tensor | list[int] | None = None,
                hidden: torch.Tensor | None = None, start_layer: int = 0) -> list[RowOutput]:
        """tokens (N,) from the embeddings, or hidden (N, H) entering `start_layer`, where N is
        the rows' lengths summed: row i's inputs follow row i-1's."""
        active = self._start(rows, tokens, hidden, start_layer)
        outputs = [RowOutput() for _ in rows]
        keep = {r.keep_hidden for r in rows}
        for i in range(start_layer, self.config.num_hidden_layers):
            if i in keep:
                self._keep_hidden(i, rows, active, outputs)
            if i in self.early:
                active = self._exit_point(i, rows, active, outputs)
                if not active.index:
                    return outputs
            active.x = self.kernels.layer(self.model.model.layers[str(i)], active.x, active.rotary, active.batch)
        finishing = [j for j, b in enumerate(active.index) if b not in active.decided]
        if finishing:
            done = active.select(finishing)
            self._norm_and_head(self.last, done.x[0], done.batch.offsets, done.index, rows, outputs)
        return outputs

    def _start(self, rows: list[Row], tokens: torch.Tensor | list[int] | None, hidden: torch.Tensor | None,
               start_layer: int) -> _Active:
        """Every row running, from the token embeddings or the given hidden states."""
        inputs = None
        if hidden is None:
            inputs = tokens
            tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.cache.device)
            x = self.model.model.embed_tokens(tokens)[None]
        else:
            x = hidden[None]
        if x.shape[1] != sum(r.length for r in rows):
            raise ValueError(f"{x.shape[1]} inputs for rows of {sum(r.length for r in rows)} tokens")
        batch = self.cache.batch([r.slot for r in rows], [r.start for r in rows], [r.length for r in rows])
        active = _Active(list(range(len(rows))), x, batch, self._rotary(batch, x.dtype),
                         inputs=inputs if start_layer == 0 else None)
        if any(r.adaptive is not None and r.adaptive.rule.measure == "saturation" for r in rows):
            active.previous = active.last(list(range(len(rows))))
        return active

    @staticmethod
    def _keep_hidden(layer: int, rows: list[Row], active: _Active, outputs: list[RowOutput]) -> None:
        """The hidden states entering trunk layer `layer`, for the rows that asked for them."""
        for j, b in enumerate(active.index):
            if rows[b].keep_hidden == layer:
                outputs[b].hidden = active.x[0, active.tokens(j)]

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
        groups = self._classify(exit_layer, rows, active)
        ran = self._check(exit_layer, rows, active, groups, outputs)
        if active.previous is not None:
            active.previous = active.last(list(range(len(active.index))))
        self._leave(exit_layer, rows, active, groups, ran, outputs)
        active = self._remaining(exit_layer, rows, active, groups)
        return self._rejoin(exit_layer, rows, active)

    @staticmethod
    def _classify(exit_layer: int, rows: list[Row], active: _Active) -> _Groups:
        """What each running row does at this exit."""
        groups = _Groups()
        for j, b in enumerate(active.index):
            row, info = rows[b], rows[b].adaptive
            if info is None:
                if row.exit == exit_layer:
                    groups.leaving.append(j)
                elif exit_layer in row.extra_branches:
                    groups.branch_only.append(j)
            elif b in active.decided or not info.decide:
                if row.exit == exit_layer:
                    groups.dropping.append(j)   # prompt KV done; its branch KV is filled lazily
            elif info.cap == exit_layer:
                groups.leaving.append(j)
            elif exit_layer < info.cap and info.rule.enabled(exit_layer):
                groups.deciding.append(j)
        return groups

    def _check(self, exit_layer: int, rows: list[Row], active: _Active, groups: _Groups,
               outputs: list[RowOutput]) -> set[int]:
        """Whether the deciding rows leave here (then they join `groups.leaving`): they leave
        together or not at all, and only when no row goes deeper does leaving save a layer (see
        the module docstring). Returns the rows whose softmax check already ran their head."""
        deciding = groups.deciding
        if not deciding or len(groups.leaving) + len(groups.dropping) + len(deciding) != len(active.index):
            return set()
        if not (self._worth_checking(exit_layer, rows, active, deciding)
                and self._confident(exit_layer, rows, active, deciding, outputs)):
            return set()
        groups.leaving = sorted(groups.leaving + deciding)
        return {j for j in deciding if rows[active.index[j]].adaptive.rule.measure in SOFTMAX}

    def _leave(self, exit_layer: int, rows: list[Row], active: _Active, groups: _Groups, ran: set[int],
               outputs: list[RowOutput]) -> None:
        """Branch and head for the leaving rows (and branch KV for branch-only rows); copy-forward
        adaptive rows project the KV of the layers they skip."""
        heads = [j for j in groups.leaving if j not in ran]
        if heads and heads == list(range(len(active.index))) and all(rows[b].adaptive is None for b in active.index):
            # Every row leaves at its own tokens: the running batch is the branch's.
            h = self._branch_pass(exit_layer, active)
            self._norm_and_head(exit_layer, h, active.batch.offsets, active.index, rows, outputs)
        elif heads or groups.branch_only:
            h, offsets = self._branch_rows(exit_layer, rows, active, heads + groups.branch_only, outputs)
            self._norm_and_head(exit_layer, h, offsets[:len(heads) + 1], [active.index[j] for j in heads], rows,
                                outputs)
        copying = [j for j in groups.leaving if self._copies(exit_layer, rows[active.index[j]])]
        if copying:
            self._copy_forward(exit_layer, rows, active.select(copying))

    @staticmethod
    def _copies(exit_layer: int, row: Row) -> bool:
        """Whether a row leaving here fills its skipped layers' KV by copying forward."""
        info = row.adaptive
        return info is not None and info.pending is None and not row.full_kv and exit_layer != row.exit

    @staticmethod
    def _remaining(exit_layer: int, rows: list[Row], active: _Active, groups: _Groups) -> _Active:
        """The rows that go on: leaving rows drop out, except prompt rows still owed their KV
        (their token's exit is decided)."""
        gone = set(groups.dropping)
        for j in groups.leaving:
            b = active.index[j]
            if rows[b].full_kv and rows[b].exit != exit_layer:
                active.decided.add(b)
            else:
                gone.add(j)
        if not gone:
            return active
        return active.select([j for j in range(len(active.index)) if j not in gone])

    def _rejoin(self, exit_layer: int, rows: list[Row], active: _Active) -> _Active:
        """Pending positions whose frontier is this exit join their rows here (recompute)."""
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
            if measure in SOFTMAX and self._screened_out(exit_layer, infos, mine):
                return self._stay(active, deciding, outputs)
            scores, limits = self._scores(exit_layer, measure, rows, active, js, mine, outputs)
            if any(score < limit for score, limit in zip(scores, limits)):
                return self._stay(active, deciding, outputs)
        return True

    @staticmethod
    def _screened_out(exit_layer: int, infos: list[Adaptive], states: torch.Tensor) -> bool:
        """Whether the classifier's screen already rules out a softmax check's row here."""
        if all(info.rule.screen is None for info in infos):
            return False
        hope = infos[0].classifier.log_odds(exit_layer, states)
        return any(info.rule.screen is not None and h < log_odds(info.rule.screen[exit_layer])
                   for info, h in zip(infos, hope))

    def _scores(self, exit_layer: int, measure: str, rows: list[Row], active: _Active, js: list[int],
                states: torch.Tensor, outputs: list[RowOutput]) -> tuple[list[float], list[float]]:
        """Rows js' scores under one measure at this exit, and the limits they must reach."""
        infos = [rows[active.index[j]].adaptive for j in js]
        if measure == "classifier":
            # Log-odds against the thresholds' log-odds: the same test without a sigmoid.
            classifier = infos[0].classifier
            if exit_layer == 0 and active.inputs is not None:
                # The state entering exit 0 is the token's embedding: its score is the token's.
                table = self._embedding_log_odds(classifier)
                scores = [table[int(active.inputs[active.batch.offsets[j + 1] - 1])] for j in js]
            else:
                scores = classifier.log_odds(exit_layer, states)
            return scores, [log_odds(info.rule.thresholds[exit_layer]) for info in infos]
        if measure == "saturation":
            scores = saturation(states, active.previous[js]).tolist()
        else:
            h, offsets = self._branch_rows(exit_layer, rows, active, js, outputs)
            indices = [active.index[j] for j in js]
            self._norm_and_head(exit_layer, h, offsets, indices, rows, outputs)
            scores = softmax_score(torch.cat([outputs[b].logits[-1:] for b in indices]), measure).tolist()
        return scores, [info.rule.thresholds[exit_layer] for info in infos]

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

    def _branch_pass(self, exit_layer: int, active: _Active) -> torch.Tensor:
        """Exit `exit_layer`'s branch layers over the batch `active` holds: (N, hidden)."""
        x = active.x
        for layer in self.model.branch_layers(exit_layer):
            x = self.kernels.layer(layer, x, active.rotary, active.batch)
        return x[0]

    def _branch_rows(self, exit_layer: int, rows: list[Row], active: _Active, js: list[int],
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
        return self._branch_pass(exit_layer, branch), batch.offsets

    def _norm_and_head(self, exit_layer: int, h: torch.Tensor, offsets: list[int], index: list[int],
                       rows: list[Row], outputs: list[RowOutput]) -> None:
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
        logits = self.kernels.head(exit_layer, h)
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
            eps = self.config.rms_norm_eps
            # (1, N, layers, k|v, kv_heads, head_dim)
            kv = F.linear(rms_norm(rows_.x, None, eps), weight, bias).view(
                1, length, len(layers), 2, -1, self.config.head_dim)
            k, v = kv[:, :, :, 0], kv[:, :, :, 1]
            if k_norm is not None:  # Qwen3's per-head key norm (Llama has none)
                k = rms_norm(k, k_norm, eps)
            # Every layer's heads as the heads of one attention: (1, layers * kv_heads, N, D).
            k = apply_rotary(k.flatten(2, 3).transpose(1, 2), *rows_.rotary).unflatten(1, (len(layers), -1))
            for i, layer in enumerate(layers):
                rows_.batch.write(layer.cache_name, k[:, i], v[:, :, i].transpose(1, 2))
            for deeper in sorted(self.early):
                if exit_layer < deeper <= stop:
                    self._store_states(deeper, rows_, list(range(len(rows_.index))))

    def _projection(self, exit_layer: int, stop: int):
        """Stacked, norm-folded k/v projections of trunk layers exit_layer..stop-1 (built on
        first use, and again once the weights they come from changed)."""
        layers = [self.model.model.layers[str(i)] for i in range(self.config.num_hidden_layers)]
        sources = [t for layer in layers
                   for module in (layer.input_layernorm, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                  layer.self_attn.k_norm) if module is not None
                   for t in module.parameters()]
        weight, bias, k_norm, per = self._derived.get("kv-stack", sources, lambda: self._stack_kv(layers))
        return (weight[exit_layer * per:stop * per], bias[exit_layer * per:stop * per],
                None if k_norm is None else k_norm[exit_layer:stop], layers[exit_layer:stop])

    def _stack_kv(self, layers: list) -> tuple:
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
        return torch.cat(weights), torch.cat(biases), k_norms, rows_per_layer
