"""Self-speculative decoding inside one family, batched across sequences.

A sequence's `chain` lists exits from the smallest drafter to the verifier, e.g. [3, 11, 27]:
exit 3 drafts for 11, and 11's verified tokens are in turn the draft for 27 (a cascade).
Drafting keeps the hidden state entering trunk layer `draft exit` for every drafted input, and
the verifier resumes there, running only trunk layers draft_exit..verifier_exit-1 plus its own
branch over all drafted positions in one pass: the trunk KV the draft wrote is the verifier's
for its first layers. Rejected positions need no explicit rollback: the slot cache is
positional, so the next round writes over them in every layer (trunk and branch).

One round serves every speculative sequence of a step together: each drafting step is one
batched call over the sequences still drafting at that level, and each verification one call
per drafter exit, whatever the sequences' chains and draft lengths.

Verification recomputes, at each drafted position, the token the verifier's own sampler picks
there (`familial.infer.sampling.choose`, whose randomness depends only on the request's seed and
the position) and keeps drafted tokens while they agree; the first disagreement is replaced by
the verifier's pick. So the output is exactly what plain decoding with the verifier returns,
greedy or sampled with a seed, whatever the drafters propose; drafters drawing with the same
uniform number as the verifier agree with it often when their distributions are close.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from familial.infer.draft_policy import CallCosts, Plan
from familial.infer.runner import Row, RowOutput, Runner
from familial.infer.sampling import Draw, SamplingParams


@dataclass
class Proposal:
    """One sequence's round: where it stands and what it may draft."""

    slot: int
    # cache position of `pending`, the last token (not yet in the cache).
    length: int
    pending: int
    plan: Plan
    # at most this many tokens (the request's remaining budget and the cache's room).
    limit: int
    params: SamplingParams
    seed: int
    # sequence position of the first token this round chooses.
    position: int


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    # per level i (chain[i] drafting for chain[i + 1]): tokens drafted, compared, accepted.
    drafted: list[int] = field(default_factory=list)
    compared: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)


@dataclass
class _Item:
    """One sequence at one level of its chain during a round."""

    index: int
    # index into the chain: the verifier's level in `_verify`, the drafter's in `_draft`.
    level: int
    pos: int
    pending: int
    # tokens this round chose before `pos` at higher levels (history for the penalty).
    prefix: list[int]
    limit: int


class Speculator:
    def __init__(self, runner: Runner, choose: Callable[[torch.Tensor, list[Draw]], torch.Tensor],
                 costs: CallCosts) -> None:
        self.runner, self.choose, self.costs = runner, choose, costs

    def round(self, proposals: list[Proposal]) -> list[Outcome]:
        """Verified tokens of every proposal after its `pending` token.

        On return the cache holds every chain layer's KV for positions length..length+n-1 (the
        inputs pending, t1..t_{n-1}) and each proposal's last token is its new pending one.
        """
        self.proposals = proposals
        self.outcomes = [Outcome(drafted=[0] * (len(p.plan.chain) - 1), compared=[0] * (len(p.plan.chain) - 1),
                                 accepted=[0] * (len(p.plan.chain) - 1)) for p in proposals]
        items = [_Item(i, len(p.plan.chain) - 1, p.length, p.pending, [], p.limit)
                 for i, p in enumerate(proposals)]
        for outcome, (tokens, _) in zip(self.outcomes, self._verify(items)):
            outcome.tokens = tokens
        return self.outcomes

    def _draw(self, item: _Item, offset: int, drafted: list[int]) -> Draw:
        proposal = self.proposals[item.index]
        extra = tuple(item.prefix + drafted) if proposal.params.repetition_penalty != 1.0 else ()
        return Draw(proposal.params, proposal.seed, proposal.position + len(item.prefix) + offset,
                    proposal.slot, extra)

    def _record(self, kind: tuple | None, started: float, rows: int) -> None:
        """Time a call and the token choice after it, for the draft policy, when all its rows are
        of one kind."""
        if kind is not None:
            self.costs.record(kind, time.perf_counter() - started, rows)

    def _draft(self, items: list[_Item], counts: list[int]) -> list[tuple[list[int], torch.Tensor]]:
        """counts[i] tokens of member chain[level] for each item, and the hidden states entering
        trunk layer chain[level] for their inputs (pending, t1..t_{n-1})."""
        tokens: list[list[int]] = [[] for _ in items]
        hidden: list[list[torch.Tensor]] = [[] for _ in items]
        while True:
            need = [i for i, item in enumerate(items) if len(tokens[i]) < counts[i]]
            if not need:
                break
            bottom = [i for i in need if items[i].level == 0]
            if bottom:
                self._draft_step([items[i] for i in bottom], [tokens[i] for i in bottom],
                                 [hidden[i] for i in bottom])
            upper = [i for i in need if items[i].level > 0]
            if upper:
                deeper = [replace(items[i], pos=items[i].pos + len(tokens[i]),
                                  pending=tokens[i][-1] if tokens[i] else items[i].pending,
                                  prefix=items[i].prefix + tokens[i], limit=counts[i] - len(tokens[i]))
                          for i in upper]
                for i, (new, states) in zip(upper, self._verify(deeper)):
                    tokens[i] += new
                    hidden[i].append(states)
        return [(t, torch.cat(h)) for t, h in zip(tokens, hidden)]

    def _draft_step(self, items: list[_Item], tokens: list[list[int]], hidden: list[list[torch.Tensor]]) -> None:
        """One token for each bottom-level item, in one batched call."""
        started = time.perf_counter()
        chains = [self.proposals[item.index].plan.chain for item in items]
        rows = [Row(self.proposals[item.index].slot, item.pos + len(done), chain[0], keep_hidden=chain[0])
                for item, done, chain in zip(items, tokens, chains)]
        inputs = [done[-1] if done else item.pending for item, done in zip(items, tokens)]
        outputs = self.runner.forward(rows, tokens=inputs)
        draws = [self._draw(item, len(done), done) for item, done in zip(items, tokens)]
        chosen = self.choose(torch.cat([out.logits[-1:] for out in outputs]), draws).tolist()
        exits = {chain[0] for chain in chains}
        self._record(("step", min(exits)) if len(exits) == 1 else None, started, len(rows))
        for done, states, out, token in zip(tokens, hidden, outputs, chosen):
            done.append(token)
            states.append(out.hidden)

    def _verify(self, items: list[_Item]) -> list[tuple[list[int], torch.Tensor | None]]:
        """Each item's verifier (chain[level]) checks a draft from chain[level - 1]: the tokens it
        keeps, and (below the top) its hidden states entering trunk layer chain[level]."""
        plans = [self.proposals[item.index].plan for item in items]
        counts = [max(1, min(plan.draft[item.level - 1], item.limit)) for item, plan in zip(items, plans)]
        drafts = self._draft([replace(item, level=item.level - 1) for item in items], counts)
        results: list[tuple[list[int], torch.Tensor | None]] = [([], None)] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (item, plan) in enumerate(zip(items, plans)):
            groups.setdefault(plan.chain[item.level - 1], []).append(i)
        for start, group in groups.items():
            started = time.perf_counter()
            rows = []
            for i in group:
                item, chain = items[i], plans[i].chain
                verifier = chain[item.level]
                top = item.level == len(chain) - 1
                rows.append(Row(self.proposals[item.index].slot, item.pos, verifier, length=counts[i],
                                all_logits=True, keep_hidden=None if top else verifier))
            outputs = self.runner.forward(rows, hidden=torch.cat([drafts[i][1] for i in group]),
                                          start_layer=start)
            draws = [self._draw(items[i], j, drafts[i][0][:j]) for i in group for j in range(counts[i])]
            chosen = self.choose(torch.cat([out.logits for out in outputs]), draws).tolist()
            begin = 0
            for i, out in zip(group, outputs):
                picks = chosen[begin:begin + counts[i]]
                begin += counts[i]
                results[i] = self._keep(items[i], drafts[i][0], picks, out)
            exits = {row.exit for row in rows}
            self._record(("verify", start, min(exits)) if len(exits) == 1 else None, started, len(rows))
        return results

    def _keep(self, item: _Item, drafted: list[int], picks: list[int],
              out: RowOutput) -> tuple[list[int], torch.Tensor | None]:
        """Drafted tokens up to the first the verifier would not have picked, then its pick."""
        kept = 0
        while kept < len(drafted) and picks[kept] == drafted[kept]:
            kept += 1
        tokens = drafted[:kept] + ([picks[kept]] if kept < len(drafted) else [])
        outcome = self.outcomes[item.index]
        outcome.drafted[item.level - 1] += len(drafted)
        outcome.compared[item.level - 1] += min(kept + 1, len(drafted))
        outcome.accepted[item.level - 1] += kept
        return tokens, None if out.hidden is None else out.hidden[:len(tokens)]
