"""The count baselines are proper distributions that use the structure of their training tokens."""

from __future__ import annotations

import numpy as np

from familial.eval.ngram import Bigram, Unigram

V = 37


def distribution(model, previous: int) -> np.ndarray:
    targets = np.arange(V)
    return np.exp(-model.nll(np.full(V, previous), targets))


def training_stream(length: int = 5000, seed: int = 0) -> np.ndarray:
    # Mostly "count up by one" with some noise; token 36 never occurs.
    rng = np.random.default_rng(seed)
    tokens = np.cumsum(rng.choice([1, 1, 1, 2], size=length)) % 30
    tokens[rng.random(length) < 0.1] = rng.integers(30, 36)
    return tokens


def test_unigram_and_bigram_sum_to_one_for_seen_and_unseen_histories():
    tokens = training_stream()
    unigram, bigram = Unigram(tokens, V), Bigram(tokens, V)
    assert np.isclose(distribution(unigram, 0).sum(), 1.0)
    for previous in (3, 31, 36):    # frequent, rare, never seen as a history
        probs = distribution(bigram, previous)
        assert np.isclose(probs.sum(), 1.0) and (probs > 0).all()
    assert 0 < bigram.discount < 1


def test_bigram_learns_the_pairs_and_beats_the_unigram_on_new_text():
    bigram, unigram = Bigram(training_stream(), V), Unigram(training_stream(), V)
    assert distribution(bigram, 5).argmax() == 6
    held_out = training_stream(seed=1)
    previous, targets = held_out[:-1], held_out[1:]
    assert bigram.nll(previous, targets).mean() < unigram.nll(previous, targets).mean() - 1.0
