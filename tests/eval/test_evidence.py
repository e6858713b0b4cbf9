"""`familial compare`: members and count baselines on the same held-out targets, paired intervals."""

from __future__ import annotations

import json

import numpy as np
from kneser_ney import kneser_ney_nll

from familial.checkpoint_io import load_family
from familial.cli import main
from familial.data.shards import TokenShards, write_shards
from familial.eval.evidence import PairedBootstrap, collect, window_units
from familial.eval.ngram import stream
from familial.eval.perplexity import evaluate_held_out

SEQ = 8


def test_members_and_baselines_are_scored_on_the_same_targets(alphabet_family, alphabet_train,
                                                              alphabet_held_out):
    model = load_family(alphabet_family).eval()
    held_out = TokenShards(alphabet_held_out)
    sums = collect(model, TokenShards(alphabet_train), held_out, SEQ)
    reference = evaluate_held_out(model, held_out, SEQ)
    assert sums.unit == "document"
    assert sums.counts.sum() == reference.counts.sum() == len(reference.counts) * SEQ
    for k, name in enumerate(reference.names):
        assert np.isclose(sums.loss[name].sum(), reference.loss_sums[k].sum())
    # The bigram row is an interpolated Kneser-Ney bigram's loss on exactly those targets
    # (each consecutive pair of the held-out stream, documents joined by EOS as in training).
    ids = stream(held_out)[:len(reference.counts) * SEQ + 1].tolist()
    bigram = kneser_ney_nll(stream(TokenShards(alphabet_train)).tolist(), held_out.vocab_size, ids[:-1], ids[1:])
    assert np.isclose(sums.loss["bigram"].sum(), sum(bigram))
    assert sums.matches["full"].sum() == sums.counts.sum()


def test_few_documents_are_resampled_as_blocks_of_windows(tmp_path):
    shards = write_shards(tmp_path / "few", [np.arange(500) % 50, np.arange(300) % 50], vocab_size=50)
    units, unit = window_units(shards, 16, 40)
    assert unit == "1024-token block" and units.tolist() == [0] * 40
    units, unit = window_units(shards, 256, 3)
    assert unit == "1024-token block" and units.tolist() == [0, 0, 0]


def test_paired_intervals_are_tight_for_a_consistent_difference():
    rng = np.random.default_rng(0)
    counts = rng.integers(50, 500, size=40).astype(float)
    hardness = rng.uniform(2.0, 6.0, size=40)         # documents differ a lot in difficulty
    worse = hardness * counts
    better = (hardness - 0.05) * counts               # ... but one model is always 0.05 better
    boot = PairedBootstrap(counts, resamples=500)
    gap = boot.per_token(better - worse)
    assert gap.high < 0 and gap.excludes_zero() and np.isclose(gap.value, -0.05)
    loss_better, loss_worse = boot.per_token(better), boot.per_token(worse)
    # Unpaired, the two loss intervals overlap; paired, the difference is certain.
    assert loss_better.high > loss_worse.low
    drop = boot.ratio(worse - better, worse)
    assert 0 < drop.low <= drop.value <= drop.high


def test_compare_command_prints_every_member_and_both_baselines(alphabet_family, alphabet_train,
                                                                alphabet_held_out, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(["compare", str(alphabet_family), "--train", str(alphabet_train), "--held-out",
                 str(alphabet_held_out), "--seq-len", str(SEQ), "--resamples", "200",
                 "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    for label in ("small", "full", "unigram (add-one)", "bigram (Kneser-Ney)",
                  "full member below the smallest"):
        assert label in out
    report = json.loads(report_path.read_text())
    assert [m["name"] for m in report["members"]] == ["small", "full"]
    full = report["members"][1]
    assert full["agreement"]["value"] == 1.0 and "minus_previous" in full
    assert report["members"][0]["loss"]["low"] <= report["members"][0]["loss"]["value"]
