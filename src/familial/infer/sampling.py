"""Per-request token selection: greedy, temperature, top-k, top-p, repetition penalty.

Each request owns a `Sampler` with its own random generator, so a seeded request draws the
same tokens whatever else shares its batch. Speculative decoding needs the processed
distribution itself (`probs`), not just a draw, to accept or reject drafted tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Cap on 1/temperature: temperatures down to 1e-38 (or 5e-324) are accepted and act as greedy
# among the tied best tokens, and a finite factor keeps 0 * factor = 0 (never nan).
MAX_INVERSE_TEMPERATURE = 1e30


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
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"sampling parameter '{name}' = {getattr(self, name)!r}: expected {expected}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise bad("temperature", "a number in [0, 100]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a positive number")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "an integer or None")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of token ids")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


class Sampler:
    """Turns one position's logits into a token under a request's SamplingParams."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def process(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """(V,) raw logits -> float32 logits after repetition penalty and temperature, shifted
        so that the best token is at 0 (every other one below it, -inf included)."""
        logits = logits.float()
        penalty = self.params.repetition_penalty
        if penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        logits = logits - logits.max()
        if not self.params.is_greedy and self.params.temperature != 1.0:
            # A tiny temperature must not overflow: 1/T is capped (finite), so the best token
            # stays at 0 and the others go to -inf rather than to nan.
            logits = logits * min(1.0 / self.params.temperature, MAX_INVERSE_TEMPERATURE)
        return logits

    def probs(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """(V,) raw logits -> the distribution this request samples from (one-hot when greedy)."""
        logits = self.process(logits, history)
        if self.params.is_greedy:
            out = torch.zeros_like(logits)
            out[logits.argmax()] = 1.0
            return out
        top_k, top_p = self.params.top_k, self.params.top_p
        if 0 < top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep tokens whose preceding mass is below top_p (the most likely always stays).
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
            # top_p below float32's smallest number compares as 0: the best token still stays.
            drop[0] = False
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            probs = probs / probs.sum()
        return probs

    def choose(self, logits: torch.Tensor, history: list[int]) -> int:
        if self.params.is_greedy:
            return int(self.process(logits, history).argmax())
        return self.draw(self.probs(logits, history))

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def accept(self, p: float, q: float) -> bool:
        """Speculative acceptance of a drafted token: with probability min(1, p/q)."""
        if q <= 0:
            return p > 0
        u = float(torch.rand((), generator=self.generator))
        return u < min(1.0, p / q)
