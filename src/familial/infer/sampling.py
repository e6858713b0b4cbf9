"""Token selection for a batch of rows in one call on the device, safe for every accepted value.

Each row carries its own `SamplingParams` (greedy, temperature, top-k, top-p, repetition
penalty). The work is batched: one penalty pass, one top-k, one sort for top-p, one softmax and
one inverse-CDF draw for all rows, never a loop over rows on the host.

Numerics, in float32: logits are first made finite, then each row is shifted so its maximum is
exactly 0 before it is divided by the temperature (clamped to the smallest normal float32), so
no value the API accepts gives inf - inf or 0 / 0. A temperature too small to tell tokens apart
picks the most likely token; a repetition penalty of 0.01 or 1e-300 only scales; a top_p that
keeps nothing keeps the most likely token (as does top_k 1, with any top_p).

Randomness: the token at sequence position t is drawn by inverse CDF with one uniform number
u(seed, t), a hash of the request's seed and t. So a seeded request gets the same tokens whatever
shares its batch, and a drafted token can be verified by recomputing the verifier's own draw at
its position (familial.infer.speculative): speculative sampling returns exactly the tokens plain
sampling returns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from familial import checks

F32 = torch.finfo(torch.float32)
MASK64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    # 0 (or greedy=True) picks the most likely token.
    temperature: float = 1.0
    # keep only the k most likely tokens; 0 keeps all.
    top_k: int = 0
    # keep the smallest set of tokens whose probability reaches top_p.
    top_p: float = 1.0
    # > 1 makes tokens already in the prompt or answer less likely (CTRL-style).
    repetition_penalty: float = 1.0
    # generation ends before any of these strings (needs a tokenizer to detokenise).
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    greedy: bool = False
    # generation ends at any of these tokens (beside the family's eos), e.g. a chat
    # template's end-of-turn token; like eos, they are not part of the text.
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def label(name: str) -> str:
            return f"sampling parameter '{name}'"

        checks.integer(label("max_new_tokens"), self.max_new_tokens, "an integer >= 1", minimum=1)
        checks.finite_number(label("temperature"), self.temperature, "a number in [0, 100]", minimum=0, maximum=100)
        checks.integer(label("top_k"), self.top_k, "an integer >= 0", minimum=0)
        checks.probability(label("top_p"), self.top_p)
        checks.positive_number(label("repetition_penalty"), self.repetition_penalty)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"{label('stop')} = {self.stop!r}: expected a list of non-empty strings")
        if self.seed is not None:
            checks.integer(label("seed"), self.seed, "an integer or None")
        if not isinstance(self.stop_token_ids, list) or not all(
                checks.is_integer(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"{label('stop_token_ids')} = {self.stop_token_ids!r}: expected a list of token ids")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def request_seed(params: SamplingParams) -> int:
    """The seed a request draws with: its own, or a fresh random one."""
    return params.seed if params.seed is not None else random.getrandbits(63)


def uniform(seed: int, position: int) -> float:
    """A number in [0, 1) that depends only on (seed, position): splitmix64 of the pair."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return ((x ^ (x >> 31)) >> 11) * 2.0**-53


@dataclass
class Draw:
    """One row of a sampling call: whose rules, which position, which tokens count as seen."""

    params: SamplingParams
    seed: int
    # sequence position of the token being chosen (the prompt's first token is 0).
    position: int
    # row of the seen-token mask holding the prompt and accepted tokens (repetition penalty).
    slot: int = 0
    # tokens before this position that the mask does not hold yet (drafted in this round).
    extra_seen: tuple[int, ...] = ()


def choose(logits: torch.Tensor, draws: list[Draw], seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) raw logits -> (B,) chosen token ids, one batched computation for every row.

    `seen` is a (slots, V) boolean mask of tokens each slot's sequence has seen, for the
    repetition penalty (rows whose penalty is 1 never read it).
    """
    z = logits.float()
    if any(d.params.repetition_penalty != 1.0 for d in draws):
        z = _penalise(z, draws, seen)
    if all(d.params.is_greedy for d in draws):
        return z.argmax(-1)
    # Finite from here on: inf/nan logits (an overflowing half-precision model) cannot poison a row.
    z = torch.nan_to_num(z, nan=-F32.max, posinf=F32.max, neginf=-F32.max)
    most_likely = z.argmax(-1)
    temperature = _column([1.0 if d.params.is_greedy else max(d.params.temperature, F32.tiny) for d in draws], z)
    # Each row's maximum becomes exactly 0, so dividing by any positive temperature is safe
    # (others may go to -inf, which softmax takes as probability 0).
    scores = (z - z.amax(-1, keepdim=True)) / temperature
    vocab = z.shape[-1]
    top_k = [d.params.top_k if 0 < d.params.top_k < vocab else 0 for d in draws]
    if any(top_k):
        scores = _keep_top_k(scores, top_k)
    top_p = [d.params.top_p for d in draws]
    if any(p < 1.0 for p in top_p):
        scores = _keep_top_p(scores, top_p)
    probs = torch.softmax(scores, dim=-1)
    cumulative = probs.cumsum(-1)
    u = _column([min(uniform(d.seed, d.position), 1.0 - 2.0**-24) for d in draws], z)
    drawn = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True).clamp_(max=vocab - 1)
    # Rounding at the top of the CDF may land on a token of probability 0: take the top one then.
    drawn = torch.where(probs.gather(1, drawn) > 0, drawn, probs.argmax(-1, keepdim=True))[:, 0]
    greedy = torch.tensor([d.params.is_greedy for d in draws], device=z.device)
    return torch.where(greedy, most_likely, drawn)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)[:, None]


def _penalise(z: torch.Tensor, draws: list[Draw], seen: torch.Tensor | None) -> torch.Tensor:
    """CTRL penalty on tokens already seen: positive logits divided by it, negative multiplied."""
    if seen is None:
        mask = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
    else:
        mask = seen.index_select(0, torch.tensor([d.slot for d in draws], device=z.device))
    extra = [(i, t) for i, d in enumerate(draws) for t in d.extra_seen]
    if extra:
        rows, tokens = zip(*extra)
        mask[torch.tensor(rows, device=z.device), torch.tensor(tokens, device=z.device)] = True
    # Clamped to float32's range, so 1e-300 is a huge factor rather than a division by zero.
    penalty = [min(max(d.params.repetition_penalty, F32.tiny), F32.max) for d in draws]
    inverse = [min(1.0 / p, F32.max) for p in penalty]
    penalised = torch.where(z > 0, z * _column(inverse, z), z * _column(penalty, z))
    return torch.where(mask, penalised, z)


def _keep_top_k(scores: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    k = torch.tensor(top_k, device=scores.device)[:, None]
    values = scores.topk(max(top_k), dim=-1).values
    kth = values.gather(1, (k - 1).clamp(min=0))
    kth = torch.where(k > 0, kth, torch.full_like(kth, -float("inf")))
    return scores.masked_fill(scores < kth, -float("inf"))


def _keep_top_p(scores: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    ordered = scores.sort(dim=-1, descending=True).values
    probs = torch.softmax(ordered, dim=-1)
    # A token stays while the mass before it is below top_p; the most likely always stays.
    before = probs.cumsum(-1) - probs
    keep = before < _column(top_p, scores)
    keep[:, 0] = True
    last = ordered.gather(1, keep.sum(-1, keepdim=True) - 1)
    return scores.masked_fill(scores < last, -float("inf"))
