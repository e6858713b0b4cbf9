"""An interpolated Kneser-Ney bigram written out pair by pair, independently of
familial.eval.ngram's vectorised one, as the expectation its tests compare against."""

from __future__ import annotations

import math
from collections import Counter


def kneser_ney_nll(train: list[int], vocab_size: int, previous: list[int], targets: list[int]) -> list[float]:
    """Interpolated Kneser-Ney bigram as familial.eval.ngram documents it, written out
    pair by pair: one discount D = n1 / (n1 + 2 n2), and an add-one continuation."""
    pairs = Counter(zip(train[:-1], train[1:]))
    history = Counter()
    history_types = Counter()
    preceding = Counter()
    for (v, w), count in pairs.items():
        history[v] += count
        history_types[v] += 1
        preceding[w] += 1
    n1 = sum(1 for c in pairs.values() if c == 1)
    n2 = sum(1 for c in pairs.values() if c == 2)
    discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5   # every pair seen 3+ times: no estimate
    nll = []
    for v, w in zip(previous, targets):
        continuation = (preceding[w] + 1) / (len(pairs) + vocab_size)
        if history[v] == 0:
            p = continuation
        else:
            p = (max(pairs[v, w] - discount, 0) / history[v]
                 + discount * history_types[v] / history[v] * continuation)
        nll.append(-math.log(p))
    return nll
