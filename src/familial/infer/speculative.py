"""Self-speculative decoding inside one family: small members draft, larger ones verify.

`chain` lists exits from the smallest drafter to the verifier, e.g. [3, 11, 27]: exit 3
drafts for 11, and 11's verified tokens are in turn the draft for 27 (a cascade). Drafting
keeps the hidden state entering trunk layer `draft exit` for every drafted input, and the
verifier resumes there, running only trunk layers draft_exit..verifier_exit-1 plus its own
branch over all drafted positions in one pass: the trunk KV the draft wrote is the
verifier's for its first layers. Rejected positions need no explicit rollback: the slot
cache is positional, so the next round writes over them in every layer (trunk and branch).

Acceptance is standard speculative sampling: a drafted token d with draft probability q(d)
is kept with probability min(1, p(d)/q(d)) under the verifier's p, and on rejection the
replacement is drawn from max(0, p - q) normalised, so the output follows p exactly; under
greedy decoding this reduces to "keep d while it is the verifier's argmax", so the output
equals plain greedy decoding with the verifier. Each level's draft length adapts as in
transformers' assisted generation: two more after a fully accepted round, one fewer after
a rejection.
"""

from __future__ import annotations

import torch

from familial.infer.runner import Row, Runner
from familial.infer.sampling import Sampler


class SpeculativeDecoder:
    def __init__(self, runner: Runner, chain: list[int], draft_length: int = 4, max_draft_length: int = 16) -> None:
        if len(chain) < 2 or chain != sorted(set(chain)):
            raise ValueError(f"speculative chain {chain}: expected increasing exits, drafter first, "
                             f"verifier last")
        self.runner, self.chain = runner, chain
        self.max_draft_length = max_draft_length
        # draft length used when verifying at level i (i >= 1).
        self.k = [draft_length] * len(chain)
        self.proposed = 0
        self.accepted = 0

    def round(self, slot: int, pos: int, pending: int, history: list[int], sampler: Sampler,
              limit: int) -> list[int]:
        """Verified tokens after `pending` (the last token, not yet in the cache, at `pos`).

        On return the cache holds every layer's KV for positions pos..pos+n-1 (the inputs
        pending, t1..t_{n-1}) and the last returned token is the new pending one.
        """
        tokens, _, _ = self._verify(len(self.chain) - 1, slot, pos, pending, history, sampler, limit)
        return tokens

    def _draft(self, level: int, slot: int, pos: int, pending: int, history: list[int],
               sampler: Sampler, n: int) -> tuple[list[int], list[torch.Tensor], torch.Tensor]:
        """n tokens of member chain[level], their distributions, and the hidden states entering
        trunk layer chain[level] for the n inputs (pending, t1..t_{n-1})."""
        exit_layer = self.chain[level]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        hidden: list[torch.Tensor] = []
        while len(tokens) < n:
            if level == 0:
                current = tokens[-1] if tokens else pending
                row = Row(slot, pos + len(tokens), exit_layer, keep_hidden=exit_layer)
                out = self.runner.forward([row], tokens=torch.tensor([[current]]))[0]
                if sampler.params.is_greedy:
                    # Greedy verification compares tokens only: no distribution needed.
                    p = None
                    tokens.append(sampler.choose(out.logits[-1], history + tokens))
                else:
                    p = sampler.probs(out.logits[-1], history + tokens)
                    tokens.append(sampler.draw(p))
                probs.append(p)
                hidden.append(out.hidden)
            else:
                current = tokens[-1] if tokens else pending
                t, p, h = self._verify(level, slot, pos + len(tokens), current, history + tokens,
                                       sampler, n - len(tokens))
                tokens += t
                probs += p
                hidden.append(h)
        return tokens, probs, torch.cat(hidden, dim=0)

    def _verify(self, level: int, slot: int, pos: int, pending: int, history: list[int],
                sampler: Sampler, limit: int) -> tuple[list[int], list[torch.Tensor], torch.Tensor | None]:
        k = max(1, min(self.k[level], limit))
        drafted, q, hidden = self._draft(level - 1, slot, pos, pending, history, sampler, k)
        top = level == len(self.chain) - 1
        row = Row(slot, pos, self.chain[level], all_logits=True,
                  keep_hidden=None if top else self.chain[level])
        out = self.runner.forward([row], hidden=hidden[None], start_layer=self.chain[level - 1])[0]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        kept = 0
        for i, d in enumerate(drafted):
            if sampler.params.is_greedy:
                p = None
                token = sampler.choose(out.logits[i], history + tokens)
                keep = token == d
            else:
                p = sampler.probs(out.logits[i], history + tokens)
                token, keep = verify_token(p, q[i], d, sampler)
            probs.append(p)
            tokens.append(token)
            if not keep:
                break
            kept += 1
        if top:
            self.proposed += k
            self.accepted += kept
        self.k[level] = (min(self.k[level] + 2, self.max_draft_length) if kept == k
                         else max(1, self.k[level] - 1))
        return tokens, probs, None if top else out.hidden[: len(tokens)]


def verify_token(p: torch.Tensor, q: torch.Tensor, drafted: int, sampler: Sampler) -> tuple[int, bool]:
    """Keep `drafted` with probability min(1, p/q), else draw from max(0, p - q) normalised."""
    if sampler.accept(float(p[drafted]), float(q[drafted])):
        return drafted, True
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    return sampler.draw(residual / total if total > 0 else p), False
