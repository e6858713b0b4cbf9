"""Held-out loss and perplexity of every member in one pass, with bootstrap intervals.

The held-out shards are cut into the same windows the trainer reads (`StreamRows`: windows of
`seq_len + 1` tokens at stride `seq_len`, attention crossing document borders, loss-masked
tokens not counted). Each batch runs the trunk once for all exits; every exit's head is
applied in row chunks, so no (tokens, vocab) logits of a whole batch are ever held.

The loss is the mean token cross-entropy over all target tokens (nats), perplexity its exp.
Intervals come from the percentile bootstrap over windows: windows are drawn with
replacement (the same draws for every member, so intervals are comparable) and the ratio
sum(loss) / sum(tokens) is recomputed; the perplexity interval is exp of the loss interval.
The gap of each member's loss to the full member's gets a paired interval the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from familial.data.batches import IGNORE_INDEX, StreamRows
from familial.data.shards import TokenShards
from familial.eval.agreement import AgreementCounter
from familial.model import FamilyModel

DEFAULT_CHUNK = 1024


@dataclass
class HeldOut:
    exits: list[int]
    names: list[str]
    seq_len: int
    loss_sums: np.ndarray   # (K, W) summed token cross-entropy per exit and window
    counts: np.ndarray      # (W,) target tokens per window
    matches: np.ndarray     # (K, W) tokens where the exit's top-1 is the full member's
    pairwise: np.ndarray    # (K, K) agreement rate between every two exits

    def summary(self, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> list[dict]:
        tokens = int(self.counts.sum())
        loss = self.loss_sums.sum(1) / tokens
        agreement = self.matches.sum(1) / tokens
        loss_ci = bootstrap_ratio(self.loss_sums, self.counts, resamples, seed, level)
        agreement_ci = bootstrap_ratio(self.matches, self.counts, resamples, seed, level)
        # Paired: the same windows for both members, so the gap's interval is much tighter
        # than the two loss intervals suggest.
        gap_ci = bootstrap_ratio(self.loss_sums - self.loss_sums[-1], self.counts, resamples, seed, level)
        return [{
            "exit": e, "name": name, "tokens": tokens, "loss": float(loss[k]),
            "loss_ci": [float(x) for x in loss_ci[k]],
            "loss_gap_to_full": float(loss[k] - loss[-1]),
            "loss_gap_to_full_ci": [float(x) for x in gap_ci[k]], "perplexity": float(np.exp(loss[k])),
            "perplexity_ci": [float(x) for x in np.exp(loss_ci[k])],
            "agreement": float(agreement[k]), "agreement_ci": [float(x) for x in agreement_ci[k]],
        } for k, (e, name) in enumerate(zip(self.exits, self.names))]


def bootstrap_ratio(numerators: np.ndarray, denominators: np.ndarray, resamples: int, seed: int,
                    level: float, block: int = 64) -> np.ndarray:
    """(K, 2) percentile interval of sum(num[k]) / sum(den) over windows drawn with replacement."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level {level}: expected a number between 0 and 1")
    if resamples < 1:
        raise ValueError(f"bootstrap resamples {resamples}: expected a positive integer")
    rng = np.random.default_rng(seed)
    windows = denominators.shape[0]
    stats = []
    for start in range(0, resamples, block):
        draws = rng.integers(0, windows, size=(min(block, resamples - start), windows))
        stats.append(numerators[:, draws].sum(-1) / np.maximum(denominators[draws].sum(-1), 1))
    stats = np.concatenate(stats, axis=1)
    tail = (1 - level) / 2
    return np.quantile(stats, [tail, 1 - tail], axis=1).T


def window_count(shards: TokenShards, seq_len: int, max_tokens: int | None) -> int:
    total = (shards.num_tokens - 1) // seq_len
    if total < 1:
        raise ValueError(f"{shards.path}: {shards.num_tokens} tokens are too few for one window of "
                         f"seq_len {seq_len} (need {seq_len + 1})")
    if max_tokens is None:
        return total
    return min(total, max(1, max_tokens // seq_len))


@torch.inference_mode()
def evaluate_held_out(model: FamilyModel, shards: TokenShards, seq_len: int,
                      max_tokens: int | None = None, batch_size: int = 8,
                      chunk_size: int = DEFAULT_CHUNK, exits: list[int | str] | None = None) -> HeldOut:
    """Per-window loss sums and agreement counts of every member over the shards' first windows.

    `exits` limits the pass to those members (the trunk runs only as deep as the deepest of
    them, whose top-1 is then the agreement reference).
    """
    config = model.config
    if shards.vocab_size > config.vocab_size:
        raise ValueError(f"{shards.path}: manifest vocab_size {shards.vocab_size} exceeds the "
                         f"family's vocab_size {config.vocab_size} (shards from another tokenizer?)")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the family's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    exits = (list(config.exits) if exits is None
             else sorted({config.resolve_member(e) for e in exits}))
    windows = window_count(shards, seq_len, max_tokens)
    rows = StreamRows(shards, seq_len, shuffle=False, loop=False)
    device = next(model.parameters()).device
    loss_sums = np.zeros((len(exits), windows))
    counts = np.zeros(windows)
    agreement = AgreementCounter(exits, exits[-1])
    for start in range(0, windows, batch_size):
        batch = [next(rows) for _ in range(min(batch_size, windows - start))]
        input_ids = torch.from_numpy(np.stack([r[0] for r in batch])).to(device)
        labels = torch.from_numpy(np.stack([r[1] for r in batch])).to(device)
        keep = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        targets = labels.reshape(-1)[keep]
        window = keep // seq_len                                     # (M,) window within batch
        counts[start:start + len(batch)] = torch.bincount(window, minlength=len(batch)).cpu().numpy()
        hidden = model(input_ids, exits=exits, return_hidden=True)   # {exit: (B, T, H)}
        top1 = {}
        for k, e in enumerate(exits):
            rows_h = hidden[e].reshape(-1, hidden[e].shape[-1])[keep]  # (M, H)
            nll, top1[e] = _chunked_nll(model.exit_head(e), rows_h, targets, chunk_size)
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, window, nll)
            loss_sums[k, start:start + len(batch)] = sums.cpu().numpy()
        agreement.add(top1, window, len(batch))
    if counts.sum() == 0:
        raise ValueError(f"{shards.path}: the evaluated windows hold no target tokens (the loss "
                         f"mask is zero everywhere); raise --max-tokens or use other shards")
    return HeldOut(exits, [config.member_name(e) for e in exits], seq_len, loss_sums, counts,
                   agreement.window_matches(), agreement.matrix())


def _chunked_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy (float64) and top-1 id, one (chunk, vocab) block at a time."""
    nll = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    top1 = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        log_probs = torch.log_softmax(head(hidden[rows]).float(), dim=-1)
        nll[rows] = -log_probs.gather(1, targets[rows, None]).squeeze(1).double()
        top1[rows] = log_probs.argmax(-1)
    return nll, top1
