"""When speculation pays: each sequence picks its drafters and draft lengths from what it measures.

Speculative decoding wins only when drafted tokens are accepted often enough to pay for the
drafting, and how often depends on the prompt, the members and the sampling settings. So each
speculative sequence keeps its own acceptance rate per (drafter, verifier) pair, and the engine
keeps the measured cost of each kind of forward call (`CallCosts`). Every round the sequence's
`DraftPolicy` estimates, for each candidate chain of drafters and the best draft length at each
level, the cost per token against plain decoding with the verifier. It starts drafting only
when that is clearly cheaper (START_GAIN) and keeps drafting while it stays cheaper (KEEP_GAIN).
Otherwise it decodes plainly for a while (32 tokens, doubling up to 256 while drafting keeps
losing) and then probes with one short round, so a sequence whose acceptance recovers
speculates again and one whose acceptance stays low loses only its probes and the KV catch-up
before each. A new sequence starts from the acceptance every earlier sequence of the engine
measured for the same pair (`PooledAcceptance`), so on a family whose drafter is often wrong
its first round is a short probe, not a long draft.

With k tokens drafted and each accepted with probability a, a round yields (1 - a^k)/(1 - a)
tokens on average (the accepted ones plus the verifier's correction).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from familial.config import FamilyConfig

MAX_DRAFT = 16
# Start drafting when the estimate is this much cheaper than plain decoding, keep drafting while
# it stays somewhat cheaper: the margins cover what the estimate leaves out (a round's own
# bookkeeping, probes, KV catch-ups), and the gap between them stops a sequence near the
# threshold from switching back and forth, which costs a KV catch-up each time.
START_GAIN, KEEP_GAIN = 1.15, 1.05
MIN_BACKOFF, MAX_BACKOFF = 32, 256
# A probe drafts at most this many tokens: it is a measurement, likely to lose.
PROBE_DRAFT = 2
# Acceptance before any sequence has measured a pair: optimistic enough that drafting is tried.
FIRST_PRIOR = 0.8
# Weight (in compared tokens) of the prior in a sequence's own rate.
PRIOR_COMPARED = 2.0
# Weight of older rounds: acceptance follows the text as it changes.
DECAY = 0.8
# Weight of older rounds in the engine-wide rate: it follows the traffic, slowly.
POOLED_DECAY = 0.99
# Recent calls of each kind that its cost is taken from, and how many make it measured.
WINDOW, MIN_SAMPLES = 128, 8


class CallCosts:
    """Seconds per row of each kind of forward call, measured as the engine runs.

    Kinds: ("step", exit), one token from the embeddings to `exit` with its token choice
    (plain decoding, drafting); ("verify", drafter, verifier), drafted tokens from the drafter's
    exit to the verifier's. On a shared machine a call's time is often doubled by another
    process on its core, so a kind's cost is a low quantile of its recent calls (the quiet
    ones, which show what the calls cost relative to each other). Until a kind has MIN_SAMPLES
    calls it is estimated from its layer count, in seconds per layer (the same quantile over
    every kind's recent calls), so a kind measured only a few times cannot swing the policy.
    """

    def __init__(self, config: FamilyConfig) -> None:
        self.config = config
        self.samples: dict[tuple, deque[float]] = {}
        self.per_unit_samples: deque[float] = deque(maxlen=2 * WINDOW)
        self.seconds: dict[tuple, float] = {}
        self.per_unit: float | None = None

    def units(self, kind: tuple) -> float:
        # Two more "layers" for the head and the call's fixed overhead.
        if kind[0] == "step":
            return self.config.member_layers(kind[1]) + 2
        return self.config.member_layers(kind[2]) - kind[1] + 2

    def record(self, kind: tuple, seconds: float, rows: int) -> None:
        per_row = seconds / max(rows, 1)
        samples = self.samples.setdefault(kind, deque(maxlen=WINDOW))
        samples.append(per_row)
        if len(samples) >= MIN_SAMPLES:
            self.seconds[kind] = _quiet(samples)
        self.per_unit_samples.append(per_row / self.units(kind))
        self.per_unit = _quiet(self.per_unit_samples)

    def estimate(self, kind: tuple) -> float:
        if kind in self.seconds:
            return self.seconds[kind]
        return (self.per_unit or 1.0) * self.units(kind)


def _quiet(values) -> float:
    """The 12.5th percentile: the calls no other process slowed down."""
    ordered = sorted(values)
    return ordered[len(ordered) // 8]


class PooledAcceptance:
    """Acceptance per (drafter, verifier) over every round of every sequence: a new sequence's prior."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], list[float]] = {}

    def record(self, drafter: int, verifier: int, accepted: int, compared: int) -> None:
        counts = self.counts.setdefault((drafter, verifier), [0.0, 0.0])
        counts[0] = POOLED_DECAY * counts[0] + accepted
        counts[1] = POOLED_DECAY * counts[1] + compared

    def rate(self, drafter: int, verifier: int) -> float:
        accepted, compared = self.counts.get((drafter, verifier), (0.0, 0.0))
        return accepted / compared if compared > 0 else FIRST_PRIOR


@dataclass
class Plan:
    # exits from the first drafter to the verifier.
    chain: list[int]
    # tokens each level drafts for the level above: draft[i] for chain[i] -> chain[i + 1].
    draft: list[int]


def expected_tokens(acceptance: float, k: int) -> float:
    """Mean tokens a round of k drafts yields when each is accepted with this probability."""
    if acceptance >= 1.0:
        return float(k)
    return (1.0 - acceptance ** k) / (1.0 - acceptance)


@dataclass
class DraftPolicy:
    # chains the request allows, each ending at the verifier.
    candidates: list[list[int]]
    pooled: PooledAcceptance = field(default_factory=PooledAcceptance)
    acceptance: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    plain_left: int = 0
    backoff: int = MIN_BACKOFF
    # the first round measures acceptance whatever the prior says.
    probe_due: bool = True
    drafting: bool = False

    def rate(self, drafter: int, verifier: int) -> float:
        accepted, compared = self.acceptance.get((drafter, verifier), (0.0, 0.0))
        prior = self.pooled.rate(drafter, verifier)
        return (accepted + prior * PRIOR_COMPARED) / (compared + PRIOR_COMPARED)

    def record(self, drafter: int, verifier: int, accepted: int, compared: int) -> None:
        self.pooled.record(drafter, verifier, accepted, compared)
        counts = self.acceptance.setdefault((drafter, verifier), [0.0, 0.0])
        counts[0] = DECAY * counts[0] + accepted
        counts[1] = DECAY * counts[1] + compared

    def cost(self, chain: list[int], costs: CallCosts) -> tuple[float, list[int]]:
        """Seconds per verified token with this chain, and the best draft length per level."""
        per_token = costs.estimate(("step", chain[0]))
        draft = []
        for drafter, verifier in zip(chain, chain[1:]):
            verify = costs.estimate(("verify", drafter, verifier))
            rate = self.rate(drafter, verifier)
            per_token, k = min(((k * per_token + verify) / expected_tokens(rate, k), k)
                               for k in range(1, MAX_DRAFT + 1))
            draft.append(k)
        return per_token, draft

    def plan(self, costs: CallCosts) -> Plan | None:
        """This round's chain and draft lengths, or None to decode plainly."""
        if self.plain_left > 0:
            self.plain_left -= 1
            return None
        plain = costs.estimate(("step", self.candidates[0][-1]))
        per_token, chain, draft = self._best(costs)
        if plain / per_token >= (KEEP_GAIN if self.drafting else START_GAIN):
            if not self.drafting:
                self.backoff = max(MIN_BACKOFF, self.backoff // 2)
            self.drafting, self.probe_due = True, False
            return Plan(chain, draft)
        self.drafting = False
        if self.probe_due:
            # Measure again after a plain spell: acceptance may have changed with the text.
            self.probe_due = False
            return Plan(chain, [min(k, PROBE_DRAFT) for k in draft])
        self.plain_left = self.backoff
        self.backoff = min(2 * self.backoff, MAX_BACKOFF)
        self.probe_due = True
        return None

    def _best(self, costs: CallCosts) -> tuple[float, list[int], list[int]]:
        best = None
        for chain in self.candidates:
            per_token, draft = self.cost(chain, costs)
            if best is None or per_token < best[0]:
                best = (per_token, chain, draft)
        return best
