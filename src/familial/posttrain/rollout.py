"""GRPO's rollouts through the serving engine, and the batch the update trains on.

The engine (familial.infer.engine) runs over the family's own modules, so every rollout sees
the policy's weights as the optimiser left them: nothing is copied or rebuilt between steps,
and its KV cache (one slot per completion of the step) is allocated once and written in place.
A whole step's completions (every prompt's group) run as one continuously batched job; each
completion draws its tokens with its own seed, so a completion is the same whichever process
or batch generates it (familial.infer.sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from familial.infer.engine import Engine
from familial.infer.sampling import SamplingParams
from familial.model import FamilyModel

MAX_PREFILL = 16384


@dataclass
class Rollout:
    """Prompts and their sampled completions, as token ids (a completion ends with its stop
    token when one ended it)."""

    prompts: list[list[int]]
    completions: list[list[int]]


class RolloutEngine:
    """An engine over `model` for one member, sized for `slots` completions at a time."""

    def __init__(self, model: FamilyModel, exit_layer: int, slots: int, max_seq_len: int,
                 stop_ids: set[int], device: torch.device) -> None:
        self.exit, self.stop_ids = exit_layer, sorted(stop_ids)
        # A step's prompts prefill together in the engine's first call (up to a bound on the
        # packed call's activations; beyond it, over a few calls).
        self.engine = Engine(model, max_batch_size=slots, max_queue=slots, device=str(device),
                             max_seq_len=max_seq_len, max_prefill_tokens=min(slots * max_seq_len, MAX_PREFILL))

    def sample(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
               seeds: list[int]) -> Rollout:
        """One completion per prompt, prompt i drawn with seeds[i]."""
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                 stop_token_ids=self.stop_ids) for seed in seeds]
        return self._run(prompts, params)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> Rollout:
        params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, stop_token_ids=self.stop_ids)
        return self._run(prompts, [params] * len(prompts))

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> Rollout:
        results = self.engine.generate(prompts, self.exit, params)
        for result in results:
            if result.error is not None:
                raise RuntimeError(f"grpo rollout failed: {result.error}")
        return Rollout([list(p) for p in prompts], [r.token_ids for r in results])


@dataclass
class SequenceBatch:
    """A rollout laid out for one training forward.

    Each row is prompt + completion from position 0, padded on the right, so a plain causal
    mask is exact for every real token (the fast attention path, no 4-D mask). Only the rows
    predicting a completion token reach the head: (b, t) = `rows`, `columns`.
    """

    input_ids: torch.Tensor     # (B, W)
    rows: torch.Tensor          # (M,) batch row of each completion token
    columns: torch.Tensor       # (M,) position predicting it (one before the token)
    targets: torch.Tensor       # (M,) the completion token
    mask: torch.Tensor          # (B, C) 1 for completion tokens, C the longest completion
    slots: torch.Tensor         # (M,) index into the flattened (B, C) completion grid

    @classmethod
    def of(cls, rollout: Rollout, pad_id: int, device: torch.device) -> SequenceBatch:
        lengths = [len(p) + len(c) for p, c in zip(rollout.prompts, rollout.completions)]
        longest = max(max(len(c) for c in rollout.completions), 1)
        ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
        rows, columns, targets, slots = [], [], [], []
        for b, (prompt, completion) in enumerate(zip(rollout.prompts, rollout.completions)):
            ids[b, :len(prompt) + len(completion)] = torch.tensor(prompt + completion, dtype=torch.long)
            for i, token in enumerate(completion):
                rows.append(b)
                columns.append(len(prompt) + i - 1)
                targets.append(token)
                slots.append(b * longest + i)
        mask = torch.zeros(len(lengths) * longest, dtype=torch.long)
        mask[slots] = 1

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(ids.to(device), tensor(rows), tensor(columns), tensor(targets),
                   mask.view(len(lengths), longest).to(device), tensor(slots))

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        """(M,) per-token values -> (B, C), zero where there is no completion token."""
        out = values.new_zeros(self.mask.numel())
        return out.index_put((self.slots,), values).view(self.mask.shape)
