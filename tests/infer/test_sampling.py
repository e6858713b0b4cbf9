"""Batched token choice: exact for greedy, a true sample of the distribution, safe at every
value the API accepts."""

from __future__ import annotations

import pytest
import torch

from familial.infer.sampling import Draw, SamplingParams, choose

LOGITS = torch.tensor([[2.0, 7.5, 7.4, -3.0, 0.5, 50.0, -80.0, 1.0]])


def _choose(logits, seen=None, **params):
    return int(choose(logits, [Draw(SamplingParams(**params), seed=3, position=9)], seen)[0])


@pytest.mark.parametrize("params", [
    dict(temperature=1e-45), dict(temperature=1e-38), dict(top_p=1e-300), dict(top_p=1e-300, top_k=1),
    dict(top_k=1, top_p=0.5), dict(temperature=100.0, top_k=1), dict(greedy=True)])
def test_extreme_settings_pick_the_most_likely_token(params):
    assert _choose(LOGITS, **params) == 5


def test_extreme_repetition_penalties_stay_finite():
    seen = torch.zeros(1, 8, dtype=torch.bool)
    seen[0, 5] = True
    # 0.01 multiplies the seen token's positive logit by 100; 1e-300 by float32's largest factor.
    assert _choose(LOGITS, seen, repetition_penalty=0.01, temperature=1e-38) == 5
    assert _choose(LOGITS, seen, repetition_penalty=1e-300, temperature=0.7, seed=1) == 5
    # A huge penalty pushes the seen token below every other.
    assert _choose(LOGITS, seen, repetition_penalty=1e300, greedy=True) == 1


def test_non_finite_logits_still_give_a_token():
    logits = torch.tensor([[float("nan"), float("inf"), 1.0, -float("inf")]])
    assert _choose(logits, temperature=0.9) == 1
    assert 0 <= _choose(torch.full((1, 4), float("nan")), temperature=0.9) < 4


def test_draws_follow_the_distribution_and_depend_only_on_seed_and_position():
    logits = torch.tensor([[1.0, 0.0, 2.0, -1.0, 0.5]])
    params = SamplingParams(temperature=0.7)
    rows = [Draw(params, seed=s, position=4) for s in range(6000)]
    tokens = choose(logits.expand(len(rows), -1), rows)
    counts = torch.bincount(tokens, minlength=5).float() / len(rows)
    torch.testing.assert_close(counts, torch.softmax(logits[0] / 0.7, -1), atol=0.02, rtol=0)
    mixed = [Draw(SamplingParams(greedy=True), 0, 0), rows[7], Draw(SamplingParams(top_k=2), 1, 1)]
    assert int(choose(logits.expand(3, -1), mixed)[1]) == int(tokens[7])


def test_top_k_and_top_p_keep_only_the_nucleus():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    for seed in range(200):
        assert _choose(logits, top_k=2, seed=seed) in (0, 1)
        # Tokens 0 and 1 hold ~95% of the mass: top_p 0.9 keeps both, nothing else.
        assert int(choose(logits, [Draw(SamplingParams(top_p=0.9), seed, 0)])[0]) in (0, 1)
