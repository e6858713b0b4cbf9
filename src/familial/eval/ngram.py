"""Unigram and bigram baselines fitted to a run's training tokens: what a model must beat.

A transformer trained for a few minutes can end up no better than counting; comparing each
member with count models fitted to the very tokens it trained on says whether it learned
anything beyond them. Both read the training shards as one token stream (documents end in
EOS), the way `StreamRows` feeds the trainer, so they see exactly the pairs the model saw.

- unigram: add-one (Laplace) smoothed token frequencies, P(w) = (c(w) + 1) / (N + V).
- bigram: interpolated Kneser-Ney (Chen & Goodman 1998) with one absolute discount
  D = n1 / (n1 + 2 n2) (Ney's estimate; n_k = bigram types seen k times):
  P(w | v) = max(c(v, w) - D, 0) / c(v) + D N1+(v, .) / c(v) * P_cont(w), and
  P(w | v) = P_cont(w) for a v never seen as a history. The continuation probability
  P_cont(w) = (N1+(., w) + 1) / (N1+(., .) + V) counts the distinct tokens w follows,
  add-one smoothed so that every token keeps some mass.
"""

from __future__ import annotations

import numpy as np

from familial.data.shards import TokenShards


def stream(shards: TokenShards) -> np.ndarray:
    """The shards' tokens as one int64 array (documents in order, EOS included)."""
    return np.asarray(shards.tokens[int(shards.documents[0]):int(shards.documents[-1])], dtype=np.int64)


class Unigram:
    def __init__(self, tokens: np.ndarray, vocab_size: int) -> None:
        counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
        self.log_probs = np.log(counts + 1) - np.log(counts.sum() + vocab_size)   # (V,)

    def nll(self, previous: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """-log P(target) per position (`previous` is unused; same signature as Bigram)."""
        return -self.log_probs[targets]


class Bigram:
    def __init__(self, tokens: np.ndarray, vocab_size: int) -> None:
        v = vocab_size
        self.vocab_size = v
        pairs, counts = np.unique(tokens[:-1] * v + tokens[1:], return_counts=True)
        self.pairs, self.counts = pairs, counts.astype(np.float64)      # sorted pair codes
        history, following = pairs // v, pairs % v
        self.history_counts = np.bincount(history, weights=self.counts, minlength=v)   # c(v)
        self.history_types = np.bincount(history, minlength=v).astype(np.float64)     # N1+(v, .)
        n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
        self.discount = float(n1 / (n1 + 2 * n2)) if n1 + n2 else 0.5
        preceding = np.bincount(following, minlength=v).astype(np.float64)             # N1+(., w)
        self.continuation = (preceding + 1) / (len(pairs) + v)

    def nll(self, previous: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """-log P(target | previous) per position."""
        codes = previous * self.vocab_size + targets
        where = np.minimum(np.searchsorted(self.pairs, codes), len(self.pairs) - 1)
        pair_counts = np.where(self.pairs[where] == codes, self.counts[where], 0.0)
        seen = self.history_counts[previous]
        safe = np.maximum(seen, 1.0)
        discounted = np.maximum(pair_counts - self.discount, 0.0) / safe
        backoff = self.discount * self.history_types[previous] / safe
        probs = np.where(seen > 0, discounted + backoff * self.continuation[targets],
                         self.continuation[targets])
        return -np.log(probs)
