"""Held-out loss, perplexity and agreement of every member, checked against each member alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from familial.config import FamilyConfig
from familial.data.shards import Document, TokenShards, write_shards
from familial.eval.perplexity import bootstrap_ratio, evaluate_held_out
from familial.model import FamilyModel

SEQ = 16


@pytest.fixture(scope="module")
def family() -> FamilyModel:
    torch.manual_seed(0)
    config = FamilyConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                          num_attention_heads=4, num_key_value_heads=2, exits=[0, 2, 4],
                          branch_layers=[1, 2], max_position_embeddings=64)
    return FamilyModel(config).eval()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> TokenShards:
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 61, size=n) for n in (40, 23, 57)]
    # A chat-like document whose first half is not a target: it must not count.
    ids = rng.integers(0, 61, size=30)
    documents.append(Document(ids, np.r_[np.zeros(15, np.uint8), np.ones(15, np.uint8)]))
    return write_shards(tmp_path_factory.mktemp("held") / "shards", documents, vocab_size=61)


def member_reference(model: FamilyModel, shards: TokenShards, windows: int):
    """Per exit: mean cross-entropy and top-1 ids from the member's own full logits."""
    tokens = np.asarray(shards.tokens, dtype=np.int64)
    mask = np.asarray(shards.loss_mask)
    inputs = torch.tensor(np.stack([tokens[w * SEQ:w * SEQ + SEQ] for w in range(windows)]))
    targets = torch.tensor(np.stack([tokens[w * SEQ + 1:w * SEQ + SEQ + 1] for w in range(windows)]))
    keep = torch.tensor(np.stack([mask[w * SEQ + 1:w * SEQ + SEQ + 1] for w in range(windows)])) == 1
    out = {}
    with torch.no_grad():
        for e in model.config.exits:
            logits = model.member(e)(inputs)
            losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            out[e] = (losses[keep].double().mean().item(), logits.argmax(-1)[keep])
    return out, int(keep.sum())


def test_perplexity_of_every_member_is_exp_of_its_own_mean_token_loss(family, shards):
    held = evaluate_held_out(family, shards, SEQ, batch_size=3, chunk_size=7)
    windows = (shards.num_tokens - 1) // SEQ
    reference, targets = member_reference(family, shards, windows)
    summary = held.summary(resamples=200, seed=0)
    full = family.config.exits[-1]
    assert [m["exit"] for m in summary] == family.config.exits
    for m in summary:
        loss, top1 = reference[m["exit"]]
        assert m["tokens"] == targets
        assert m["loss"] == pytest.approx(loss, rel=1e-5)
        assert m["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        agreement = (top1 == reference[full][1]).double().mean().item()
        assert m["agreement"] == pytest.approx(agreement)
        low, high = m["perplexity_ci"]
        assert low <= m["perplexity"] <= high
        assert m["perplexity_ci"] == pytest.approx(np.exp(m["loss_ci"]).tolist())
    assert summary[-1]["agreement"] == 1.0 and summary[-1]["loss_gap_to_full_ci"] == [0.0, 0.0]
    gap = summary[0]["loss_gap_to_full_ci"]
    assert gap[0] <= summary[0]["loss"] - summary[-1]["loss"] <= gap[1]
    assert held.pairwise.shape == (3, 3) and np.allclose(np.diag(held.pairwise), 1.0)
    assert held.pairwise[0, 2] == pytest.approx(summary[0]["agreement"])
    # The same seed gives the same interval; the interval is a property of the data, not luck.
    assert held.summary(resamples=200, seed=0) == summary


def test_max_tokens_limits_the_windows_evaluated(family, shards):
    held = evaluate_held_out(family, shards, SEQ, max_tokens=2 * SEQ)
    reference, targets = member_reference(family, shards, 2)
    assert held.counts.shape == (2,) and held.counts.sum() == targets
    assert held.summary(resamples=10)[0]["loss"] == pytest.approx(reference[0][0], rel=1e-5)


def test_bootstrap_interval_of_a_constant_ratio_is_that_ratio():
    counts = np.array([10.0, 20.0, 5.0, 7.0])
    low, high = bootstrap_ratio(np.stack([counts * 2.5]), counts, 100, 0, 0.95)[0]
    assert low == pytest.approx(2.5) and high == pytest.approx(2.5)
    rng = np.random.default_rng(1)
    sums, counts = rng.random((2, 300)) * 10, np.full(300, 5.0)
    intervals = bootstrap_ratio(sums, counts, 500, 0, 0.9)
    point = sums.sum(1) / counts.sum()
    assert np.all(intervals[:, 0] < point) and np.all(point < intervals[:, 1])


def test_shards_from_a_larger_vocabulary_are_refused(family, tmp_path):
    shards = write_shards(tmp_path / "big", [np.arange(100) % 90], vocab_size=90)
    with pytest.raises(ValueError, match="vocab_size 90 exceeds the family's vocab_size 61"):
        evaluate_held_out(family, shards, SEQ)
