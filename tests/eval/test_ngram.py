"""The count baselines are proper distributions that use the structure of their training tokens."""

from __future__ import annotations

import numpy as np

from kneser_ney import kneser_ney_nll

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


def test_bigram_is_interpolated_kneser_ney():
    tokens = training_stream(length=400)   # short: pairs seen once and twice set the discount
    held_out = training_stream(length=400, seed=1)
    # Index 36 never occurs in training: a history the bigram backs off from entirely.
    previous = np.concatenate([held_out[:-1], [36, 36]])
    targets = np.concatenate([held_out[1:], [3, 36]])
    expected = kneser_ney_nll(tokens.tolist(), V, previous.tolist(), targets.tolist())
    np.testing.assert_allclose(Bigram(tokens, V).nll(previous, targets), expected, rtol=1e-12)


def test_bigram_learns_the_pairs_and_beats_the_unigram_on_new_text():
    bigram, unigram = Bigram(training_stream(), V), Unigram(training_stream(), V)
    assert distribution(bigram, 5).argmax() == 6
    held_out = training_stream(seed=1)
    previous, targets = held_out[:-1], held_out[1:]
    assert bigram.nll(previous, targets).mean() < unigram.nll(previous, targets).mean() - 1.0
