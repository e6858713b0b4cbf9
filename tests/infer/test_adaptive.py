"""Adaptive early exit: decisions per token and sequence, the skipped layers' KV, depth budgets,
per-request targets, and calibration stored in the checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from familial.checkpoint_io import save_family, verify_checksums
from familial.cli import main
from familial.infer import Engine, SamplingParams
from familial.infer.adaptive import CHECK_COST, OFF, EarlyExit, ExitClassifier, ExitRule
from familial.infer.cache import SlotCache
from familial.infer.calibrate import (
    agreement_lower_bound,
    calibrate,
    check_layers,
    exit_features,
    leave_at,
    paying,
)
from familial.infer.runner import Row, Runner

GREEDY = SamplingParams(max_new_tokens=12, greedy=True)
PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44], [7, 7]]


def _thresholds(family, value):
    family.config.runtime["early_exit"] = {"metric": "top1", "thresholds": {"1": value, "3": value}}


@pytest.fixture(scope="module")
def calibrated(family_factory):
    """The test family calibrated on random tokens (its exits rarely agree, so the rules the
    tests need set their thresholds by hand, from the stored classifier's scores)."""
    family = family_factory()
    ids = np.random.default_rng(0).integers(0, 97, 2048)
    return family, calibrate(family, ids, target=0.5, seq_len=64)


def _quantile_rule(family, classifier: ExitClassifier, measure: str, q: float = 0.5) -> ExitRule:
    """Thresholds at the q-quantile of each exit's scores on random text (the median: tokens
    leave at every exit)."""
    windows = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(5))
    features = exit_features(family, windows)
    scores = _scores(features, classifier, measure)
    return ExitRule(measure, {e: float(s.float().quantile(q)) + 1e-4 for e, s in scores.items()},
                    {e: 0.0 for e in scores} if measure == "top1" else None)


def _scores(features, classifier, measure):
    if measure == "classifier":
        return {e: classifier.probability(e, s) for e, s in features.states.items()}
    return features.scores[measure]


def together_from_scratch(family, prompts, early_exit: EarlyExit, steps: int) -> list[tuple[list[int], list[int]]]:
    """Adaptive greedy decoding of sequences in lockstep, every layer recomputed for every
    position each step: the batch leaves at the first exit where every sequence's last token
    may leave (its teacher-forced score reaches the threshold), each with its token there."""
    ids, exits = [list(p) for p in prompts], [[] for _ in prompts]
    rule, classifier = early_exit.rule, early_exit.classifier
    for _ in range(steps):
        features = [exit_features(family, torch.tensor([s])) for s in ids]
        scores = [_scores(f, classifier, rule.measure) for f in features]
        leave = next((e for e in family.config.exits[:-1] if rule.enabled(e)
                      and all(float(s[e][-1]) >= rule.thresholds[e] for s in scores)), family.config.exits[-1])
        for s, f, e in zip(ids, features, exits):
            e.append(leave)
            s.append(int(f.tokens[leave][-1]))
    return [(s[len(p):], e) for s, p, e in zip(ids, prompts, exits)]


def from_scratch(family, prompt, early_exit: EarlyExit, steps: int) -> tuple[list[int], list[int]]:
    """Adaptive greedy decoding by re-running the whole sequence each step, every layer
    computed for every position: the rule applied to the last position's teacher-forced scores."""
    ids, exits = list(prompt), []
    rule, classifier = early_exit.rule, early_exit.classifier
    for _ in range(steps):
        features = exit_features(family, torch.tensor([ids]))
        scores = {e: s[-1:] for e, s in _scores(features, classifier, rule.measure).items()}
        screens = {e: classifier.probability(e, s[-1:]) for e, s in features.states.items()} \
            if rule.screen else None
        exit_layer = int(leave_at(family.config, rule, scores, screens)[0][0])
        exits.append(exit_layer)
        ids.append(int(features.tokens[exit_layer][-1]))
    return ids[len(prompt):], exits


def _generate(engine, prompts, **kwargs):
    """Prompts decoded together in one running batch."""
    handles = [engine.submit(p, member="auto", params=GREEDY, **kwargs) for p in prompts]
    with engine._drive:
        while not all(h.done for h in handles):
            engine._step()
    events = [[e for e in h if e.token_id is not None] for h in handles]
    return [([e.token_id for e in ev], [e.exit for e in ev]) for ev in events]


@pytest.mark.parametrize("measure", ["classifier", "saturation", "top1"])
def test_recomputed_kv_gives_the_tokens_and_exits_of_deciding_from_scratch(calibrated, measure):
    """Sequences decoded one after another in a running engine, tokens leaving at every exit:
    each one's tokens and exits are those of recomputing it from scratch every step (the
    stored classifier's decisions included)."""
    family, calibration = calibrated
    early_exit = calibration.early_exit()
    early_exit = dataclasses.replace(early_exit, rule=_quantile_rule(family, early_exit.classifier, measure))
    engine = Engine(family, max_batch_size=1, max_seq_len=64, early_exit=early_exit, exit_kv="recompute")
    got = _generate(engine, PROMPTS)
    for prompt, (tokens, exits) in zip(PROMPTS, got):
        assert (tokens, exits) == from_scratch(family, prompt, early_exit, 12)
    assert {e for _, exits in got for e in exits} == {1, 3, 5}


@pytest.mark.parametrize("measure", ["classifier", "top1"])
def test_batch_leaves_together_where_every_sequence_may_leave(calibrated, measure):
    """Decoded together, the batch leaves an exit only when every sequence's token may leave
    there; tokens and exits are those of recomputing the lockstep batch from scratch."""
    family, calibration = calibrated
    early_exit = calibration.early_exit()
    early_exit = dataclasses.replace(early_exit, rule=_quantile_rule(family, early_exit.classifier, measure, 0.2))
    engine = Engine(family, max_batch_size=3, max_seq_len=64, early_exit=early_exit, exit_kv="recompute")
    got = _generate(engine, PROMPTS)
    assert got == together_from_scratch(family, PROMPTS, early_exit, 12)
    assert {e for _, exits in got for e in exits} > {5}


def test_threshold_one_gives_exactly_the_full_member(calibrated, greedy_reference):
    family, calibration = calibrated
    for measure in ("top1", "saturation", "classifier"):
        early_exit = dataclasses.replace(calibration.early_exit(), rule=ExitRule(measure, {1: OFF, 3: OFF}))
        engine = Engine(family, max_batch_size=3, early_exit=early_exit)
        for prompt, (tokens, exits) in zip(PROMPTS, _generate(engine, PROMPTS)):
            assert tokens == greedy_reference(family, prompt, 5, 12) and set(exits) == {5}
    # Softmax peaked to exactly 1.0 in float32 still does not leave at threshold 1.
    head = family.branches["1"].lm_head.weight
    saved = head.detach().clone()
    _thresholds(family, 1.0)
    with torch.no_grad():
        head.mul_(1000)
    try:
        assert Engine(family).generate([[1, 2, 3]], member="auto", params=GREEDY)[0].exits == [5] * 12
    finally:
        with torch.no_grad():
            head.copy_(saved)
        family.config.runtime.pop("early_exit")


def test_threshold_zero_exits_first_or_with_a_deeper_fixed_member(family, greedy_reference):
    """Alone, the batch leaves at the first exit; beside a fixed member-3 sequence, whose rows
    run to exit 3 anyway, it leaves there with it."""
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44]]
    _thresholds(family, 0.0)
    engine = Engine(family, max_batch_size=4)
    for prompt, result in zip(prompts, engine.generate(prompts, member="auto", params=GREEDY)):
        assert result.token_ids == greedy_reference(family, prompt, 1, 12)
        assert set(result.exits) == {1}
    fixed = engine.submit([7, 7], member=3, params=GREEDY)
    for prompt, result in zip(prompts, engine.generate(prompts, member="auto", params=GREEDY)):
        assert result.token_ids == greedy_reference(family, prompt, 3, 12)
        assert set(result.exits) == {3}
    assert [e.token_id for e in fixed] == greedy_reference(family, [7, 7], 3, 12)


def test_batch_checks_an_exit_only_where_all_its_rows_may_well_leave(family, greedy_reference):
    """With calibrated leave rates of 10%, three sequences together would all leave 1 time in
    1,000: the batch does not check and runs the full member, while a lone sequence checks
    (and leaves: every token is confident at threshold 0)."""
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44], [7, 7]]
    rule = ExitRule("top1", {1: 0.0, 3: 0.0}, leave={1: 0.1, 3: 0.1})
    together = Engine(family, max_batch_size=3, early_exit=EarlyExit(rule))
    for prompt, result in zip(prompts, together.generate(prompts, member="auto", params=GREEDY)):
        assert result.token_ids == greedy_reference(family, prompt, 5, 12) and set(result.exits) == {5}
    alone = Engine(family, max_batch_size=1, early_exit=EarlyExit(rule))
    result = alone.generate(prompts[:1], member="auto", params=GREEDY)[0]
    assert result.token_ids == greedy_reference(family, prompts[0], 1, 12) and set(result.exits) == {1}
    likely = dataclasses.replace(rule, leave={1: 0.9, 3: 0.9})
    result = Engine(family, max_batch_size=3, early_exit=EarlyExit(likely)).generate(prompts, member="auto",
                                                                                     params=GREEDY)
    assert all(set(r.exits) == {1} for r in result)


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qwen3", "llama"])
def test_copied_kv_is_exact_at_the_exit_layer_and_fills_deeper_layers(family_factory, qk_norm):
    """CALM's copy: tokens leaving at exit 1 write K/V for the trunk layers they skip from
    their state there; layer 1's is exact, deeper ones approximate (with and without Qwen3's
    key norm, which the copy folds in)."""
    family = family_factory(qk_norm=qk_norm)
    _thresholds(family, 0.0)
    engine = Engine(family, max_batch_size=1, max_seq_len=64, exit_kv="copy")
    prompt = [1, 2, 3]
    result = engine.generate([prompt], member="auto", params=SamplingParams(max_new_tokens=8, greedy=True))[0]
    # The last generated token is never fed, so its KV is not in the cache.
    ids = prompt + result.token_ids[:-1]
    n, reference = len(ids), SlotCache(family.config, 1, 64)
    Runner(family, reference).forward([Row(0, 0, 5, length=n, extra_branches=frozenset({1, 3}))], tokens=ids)
    for name in ("layers.0", "branches.1.layers.0", "layers.1"):
        for ours, exact in ((engine.cache.keys, reference.keys), (engine.cache.values, reference.values)):
            torch.testing.assert_close(ours[name][0, :, :n], exact[name][0, :, :n], atol=1e-4, rtol=1e-4)
    for name in ("layers.3", "layers.5"):
        copied = engine.cache.keys[name][0, :, len(prompt):n]
        assert copied.abs().sum() > 0
        assert not torch.allclose(copied, reference.keys[name][0, :, len(prompt):n], atol=1e-3)


def test_budget_caps_average_depth(family):
    _thresholds(family, OFF)
    engine = Engine(family)
    for budget in (0.4, 0.6):
        result = engine.generate([[5, 6, 7]], params=SamplingParams(max_new_tokens=20, greedy=True),
                                 budget=budget)[0]
        depths = [family.config.member_layers(e) for e in result.exits]
        assert sum(depths) / len(depths) <= budget * family.config.num_hidden_layers
        assert len(set(result.exits)) > 1


def test_exit_is_decided_per_sequence_within_a_batch(family):
    """Two adaptive requests decoded together exit where each would alone."""
    _thresholds(family, OFF)
    engine = Engine(family, max_batch_size=2)
    params = SamplingParams(max_new_tokens=10, greedy=True)
    alone = [engine.generate([[4, 5, 6]], params=params, budget=b)[0] for b in (0.4, 1.0)]
    together = [engine.submit([4, 5, 6], params=params, budget=b) for b in (0.4, 1.0)]
    with engine._drive:
        while not all(h.done for h in together):
            engine._step()
    events = [list(h) for h in together]
    assert [[e.exit for e in ev] for ev in events] == [r.exits for r in alone]
    assert [[e.token_id for e in ev] for ev in events] == [r.token_ids for r in alone]
    assert set(alone[1].exits) == {5} and 1 in alone[0].exits


def test_calibrate_command_stores_the_classifier_and_keeps_checksums_valid(family, tmp_path, capsys):
    from familial.data.shards import write_shards

    directory = tmp_path / "family"
    save_family(family, directory)
    rng = np.random.default_rng(0)
    write_shards(tmp_path / "held_out", [rng.integers(0, 97, 300) for _ in range(4)], vocab_size=97)
    command = ["calibrate", str(directory), "--data", str(tmp_path / "held_out"), "--target", "0.5",
               "--seq-len", "64"]
    assert main(command) == 0
    assert "guarantee" in capsys.readouterr().out
    stored = json.loads((directory / "family.json").read_text())
    settings = stored["runtime"]["early_exit"]
    assert settings["metric"] == "classifier" and settings["target"] == 0.5 and settings["tokens"] == 1152
    first = settings["classifier"]["file"]
    assert set(stored["files"]) == {"model.safetensors", first}
    assert verify_checksums(directory) == sorted(stored["files"])
    # Calibrating again replaces the classifier file and its checksum, leaving no stray file.
    assert main(command + ["--metric", "saturation", "--target", "0.6"]) == 0
    stored = json.loads((directory / "family.json").read_text())
    second = stored["runtime"]["early_exit"]["classifier"]["file"]
    assert sorted(p.name for p in directory.iterdir()) == sorted(["family.json", "model.safetensors", second])
    assert verify_checksums(directory) == sorted(stored["files"])
    # A refused calibration writes nothing.
    before = (directory / "family.json").read_text()
    assert main(command[:-2] + ["--seq-len", "4096"]) == 2
    assert (directory / "family.json").read_text() == before
    engine = Engine.from_checkpoint(directory)
    assert engine.early_exit.rule.measure == "saturation"
    assert engine.generate([[1, 2]], member="auto", params=GREEDY, target=0.9)[0].finish_reason == "length"


def test_stored_calibration_reproduces_its_decisions(calibrated, tmp_path):
    """The classifier and thresholds read back from the checkpoint give, on the calibration's
    held-out half, exactly the exits and agreement the calibration reported."""
    from familial.infer.calibrate import write_early_exit

    family, calibration = calibrated
    directory = tmp_path / "family"
    save_family(family, directory)
    settings = calibration.settings(target=0.5)
    for measure in ("classifier", "saturation"):
        write_early_exit(directory, calibration.settings(measure, 0.5), calibration.classifier)
        loaded = EarlyExit.load(directory)
        ids = torch.as_tensor(np.random.default_rng(0).integers(0, 97, 2048)).view(32, 64)
        features = exit_features(family, ids[1::2])
        point = calibration.settings(measure, 0.5)["operating_point"]
        exits, _ = leave_at(family.config, loaded.rule, _scores(features, loaded.classifier, measure))
        for e, share in point["exits"].items():
            assert share["share"] == round(float((exits == int(e)).float().mean()), 4)
        for e, rate in loaded.rule.leave.items():
            assert rate == round(float((exits == e).sum() / (exits >= e).sum()), 4)
    assert settings["points"] and all("exits" not in p for p in settings["points"])


def test_target_per_request(calibrated, greedy_reference):
    family, calibration = calibrated
    engine = Engine(family, max_batch_size=2, early_exit=calibration.early_exit())
    points = calibration.settings()["points"]
    # The first point (every exit off) is the only one a target of 1 may take.
    assert engine._exit_rule(1.0).off
    low = min(p["lower_bound"] for p in points)
    assert engine._exit_rule(low).thresholds == {int(e): t for e, t in points[-1]["thresholds"].items()}
    assert engine.generate([[1, 2, 3]], params=GREEDY, target=1.0)[0].token_ids == \
        greedy_reference(family, [1, 2, 3], 5, 12)
    for bad in (0, 1.5, True, "0.9", math.nan):
        with pytest.raises(ValueError, match="target"):
            engine.submit([1, 2], member="auto", target=bad)
    with pytest.raises(ValueError, match="no calibrated operating points"):
        Engine(family).submit([1, 2], member="auto", target=0.9)
    with pytest.raises(ValueError, match="exclude each other"):
        engine.submit([1, 2], member=5, target=0.9, speculative=True)


def test_agreement_lower_bound_is_conservative():
    """Chernoff's bound: the binomial tail at the bound is at most delta."""
    for n, agreeing, delta in ((200, 190, 0.05), (1000, 950, 0.1), (50, 50, 0.05)):
        bound = agreement_lower_bound(agreeing, n, delta)
        assert bound <= agreeing / n
        eps = 1 - bound
        tail = sum(math.comb(n, i) * eps**i * (1 - eps) ** (n - i) for i in range(n - agreeing + 1))
        assert tail <= delta + 1e-9


def test_calibration_turns_off_an_exit_whose_checks_do_not_pay(family):
    """2% of tokens may leave at exit 1 (saving 4 layers each, 0.08 per token), but every token
    pays its check (0.3 layer): the exit goes off. Half leave at exit 3: it stays on."""
    scores = {1: torch.zeros(1000), 3: torch.zeros(1000)}
    scores[1][:20] = 0.99
    scores[3][500:] = 0.99
    rule = paying(family.config, ExitRule("classifier", {1: 0.9, 3: 0.9}), scores)
    assert rule.thresholds == {1: OFF, 3: 0.9}
    exits, checked = leave_at(family.config, rule, scores)
    assert check_layers(family.config, rule, exits, checked) == {3: pytest.approx(CHECK_COST["classifier"])}
    # A rule whose every exit pays is kept as it is.
    scores[1][:400] = 0.99
    assert paying(family.config, ExitRule("classifier", {1: 0.9, 3: 0.9}), scores).thresholds == {1: 0.9, 3: 0.9}


def test_a_lone_tokens_classifier_check_scores_as_the_batched_classifier(calibrated):
    """Decoding checks one token's state by a shorter route than calibration's batched one: the
    same log-odds up to rounding."""
    _, calibration = calibrated
    classifier = calibration.early_exit().classifier
    states = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 3
    for e in (1, 3):
        batched = classifier.logit(e, states)
        alone = torch.tensor([classifier.log_odds(e, states[i:i + 1])[0] for i in range(len(states))],
                             dtype=torch.float64)
        torch.testing.assert_close(alone, batched.double(), rtol=1e-5, atol=1e-5)


def test_exit_at_the_embeddings_decides_by_token_as_calibrated(family_factory):
    """An exit before the first layer sees the token's embedding, so its classifier check is a
    lookup by token id: tokens and exits are still those of deciding from scratch."""
    family = family_factory(exits=[0, 3, 5])
    calibration = calibrate(family, np.random.default_rng(0).integers(0, 97, 2048), target=0.5, seq_len=64)
    early_exit = calibration.early_exit()
    early_exit = dataclasses.replace(early_exit, rule=_quantile_rule(family, early_exit.classifier, "classifier"))
    engine = Engine(family, max_batch_size=1, max_seq_len=64, early_exit=early_exit, exit_kv="recompute")
    got = _generate(engine, PROMPTS)
    for prompt, (tokens, exits) in zip(PROMPTS, got):
        assert (tokens, exits) == from_scratch(family, prompt, early_exit, 12)
    assert {e for _, exits in got for e in exits} >= {0, 5}
    assert engine.runner._embedding_scores is not None
