"""Self-speculative decoding returns exactly what plain decoding returns, batched or not, and
drafts only while drafting pays."""

from __future__ import annotations

import pytest
import torch

from familial.infer import Engine, SamplingParams
from familial.infer.draft_policy import (
    MAX_DRAFT,
    MIN_BACKOFF,
    PROBE_DRAFT,
    CallCosts,
    DraftPolicy,
    Plan,
    PooledAcceptance,
    expected_tokens,
)

PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [60, 61, 62, 63, 64, 65, 66]]


def _fixed_costs(engine: Engine, seconds: dict) -> None:
    """Make the draft policy's costs independent of the machine: layer counts, never measured."""
    engine.costs.record = lambda *args, **kwargs: None
    engine.costs.per_unit = 1.0
    engine.costs.seconds.update(seconds)


@pytest.mark.parametrize("member, speculative", [
    (5, True), (5, 3), (5, "cascade"), (3, 1), (5, "exit-1,exit-3")])
def test_speculative_greedy_equals_plain_greedy_of_the_verifier(family, greedy_reference, member,
                                                                  speculative):
    engine = Engine(family, max_batch_size=2, max_seq_len=64)
    params = SamplingParams(max_new_tokens=14, greedy=True)
    results = engine.generate(PROMPTS, member=member, params=params, speculative=speculative)
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == greedy_reference(family, prompt, member, 14)
        assert result.exits == [member] * 14 and result.finish_reason == "length"


def test_batched_rounds_of_different_chains_equal_plain_decoding(family, greedy_reference):
    """Speculative sequences of different chains share rounds with each other and with plain ones."""
    engine = Engine(family, max_batch_size=5, max_seq_len=64)
    _fixed_costs(engine, {})
    params = SamplingParams(max_new_tokens=16, greedy=True)
    asks = [([3, 1, 4], 5, True), ([9, 2], 5, "cascade"), ([7, 7, 7, 7], 3, 1), ([5], 5, None),
            ([60, 61], 5, "exit-3")]
    handles = [engine.submit(p, member=m, params=params, speculative=s) for p, m, s in asks]
    rounds = []
    original = engine.speculator.round
    engine.speculator.round = lambda proposals: rounds.append(len(proposals)) or original(proposals)
    with engine._drive:
        while not all(h.done for h in handles):
            engine._step()
    for handle, (prompt, member, _) in zip(handles, asks):
        assert [e.token_id for e in handle] == greedy_reference(family, prompt, member, 16)
    assert max(rounds) == 4


@pytest.mark.parametrize("speculative", [True, "cascade"])
def test_speculative_sampling_equals_plain_sampling_with_the_same_seed(family, speculative):
    engine = Engine(family, max_batch_size=3)
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_k=30, top_p=0.95,
                            repetition_penalty=1.3, seed=11)
    plain = engine.generate(PROMPTS, member=5, params=params)
    fast = engine.generate(PROMPTS, member=5, params=params, speculative=speculative)
    assert [r.token_ids for r in fast] == [r.token_ids for r in plain]
    assert all(r.drafted > 0 for r in fast)


def _draft_equals_verifier(family):
    """Make member 1 compute exactly what member 5 computes: trunk layers 1-4 become identity
    and exit 1's branch, norm and head copy the last layer, norm and head."""
    with torch.no_grad():
        for i in range(1, 5):
            layer = family.model.layers[str(i)]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        family.branches["1"].layers[0].load_state_dict(family.model.layers["5"].state_dict())
        family.branches["1"].norm.load_state_dict(family.model.norm.state_dict())
        family.branches["1"].lm_head.load_state_dict(family.lm_head.state_dict())
    return family


def test_full_acceptance_drafts_long_and_accepts_everything(family, greedy_reference):
    family = _draft_equals_verifier(family)
    engine = Engine(family, max_batch_size=1, max_seq_len=96)
    _fixed_costs(engine, {})
    drafts = []
    original = engine.speculator.round
    engine.speculator.round = lambda proposals: drafts.append(proposals[0].plan.draft[0]) or original(proposals)
    result = engine.generate([[7, 8, 9]], member=5, params=SamplingParams(max_new_tokens=80, greedy=True),
                             speculative=True)[0]
    assert result.token_ids == greedy_reference(family, [7, 8, 9], 5, 80)
    assert result.accepted == result.drafted > 0
    assert max(drafts) == MAX_DRAFT


def test_drafting_stops_while_it_loses_and_the_output_is_unchanged(family, greedy_reference):
    """A drafter that is never right: the sequence soon decodes plainly, trying a round now and
    then, and its drafters' KV is filled in before each try (the output stays exact)."""
    with torch.no_grad():
        family.branches["1"].lm_head.weight.zero_()   # exit 1 always drafts token 0
    engine = Engine(family, max_batch_size=1, max_seq_len=160)
    _fixed_costs(engine, {})
    rounds = []
    original = engine.speculator.round
    engine.speculator.round = lambda proposals: rounds.append(proposals[0].length) or original(proposals)
    result = engine.generate([[4, 5, 6]], member=5, params=SamplingParams(max_new_tokens=120, greedy=True),
                             speculative=True)[0]
    assert result.token_ids == greedy_reference(family, [4, 5, 6], 5, 120)
    assert result.accepted <= 1 and 1 <= len(rounds) <= 5
    assert any(b - a > 16 for a, b in zip(rounds, rounds[1:]))


def test_policy_drafts_long_when_acceptance_is_high_and_not_at_all_when_low(tiny_config):
    costs = CallCosts(tiny_config)
    costs.per_unit = 1.0
    good = DraftPolicy([[1, 5]])
    for _ in range(10):
        good.record(1, 5, accepted=16, compared=16)
    plan = good.plan(costs)
    assert plan == Plan([1, 5], [MAX_DRAFT])
    bad = DraftPolicy([[1, 5]], probe_due=False)
    for _ in range(10):
        bad.record(1, 5, accepted=0, compared=1)
    assert [bad.plan(costs) is None for _ in range(MIN_BACKOFF + 1)] == [True] * (MIN_BACKOFF + 1)
    assert bad.plan(costs) is not None          # a probe after MIN_BACKOFF plain tokens
    assert bad.plan(costs) is None and bad.plain_left == 2 * MIN_BACKOFF   # still losing: wait twice as long


def test_a_new_sequence_starts_from_the_acceptance_earlier_sequences_measured(tiny_config):
    """Where the drafter has been wrong for earlier sequences, a new one probes with a short
    round instead of drafting long on an optimistic guess; where it has been right, it drafts long."""
    costs = CallCosts(tiny_config)
    costs.per_unit = 1.0
    losing, winning = PooledAcceptance(), PooledAcceptance()
    for _ in range(20):
        DraftPolicy([[1, 5]], losing).record(1, 5, accepted=0, compared=1)
        DraftPolicy([[1, 5]], winning).record(1, 5, accepted=16, compared=16)
    probe = DraftPolicy([[1, 5]], losing).plan(costs)
    assert probe.chain == [1, 5] and probe.draft[0] <= PROBE_DRAFT
    assert DraftPolicy([[1, 5]], winning).plan(costs) == Plan([1, 5], [MAX_DRAFT])


def test_expected_tokens_of_a_round():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.5)


@pytest.fixture
def tiny_config(family):
    return family.config


def test_switching_chains_and_plain_steps_keeps_the_output_exact(family, greedy_reference, monkeypatch):
    """Whatever the policy picks round by round (plain steps, one drafter, a cascade), drafters
    whose KV fell behind during plain steps are caught up first and the tokens stay exact."""
    pattern = [None, None, Plan([1, 3, 5], [2, 2]), None, Plan([3, 5], [3]), None, None, None,
               Plan([1, 5], [4]), Plan([1, 3, 5], [3, 1])]
    calls = iter(range(10**6))
    monkeypatch.setattr(DraftPolicy, "plan", lambda self, costs: pattern[next(calls) % len(pattern)])
    engine = Engine(family, max_batch_size=2, max_seq_len=96)
    results = engine.generate(PROMPTS[:2], member=5, params=SamplingParams(max_new_tokens=40, greedy=True),
                              speculative="cascade")
    for prompt, result in zip(PROMPTS[:2], results):
        assert result.token_ids == greedy_reference(family, prompt, 5, 40)
    assert all(r.drafted > 0 for r in results)


@pytest.mark.parametrize("end", ["eos", "stop token", "stop string"])
def test_speculative_decoding_stops_where_plain_decoding_stops(family, greedy_reference, end):
    """A drafter always right drafts long rounds, so the end falls inside an accepted draft: the
    tokens after it, accepted in the same round, are not returned."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    family = _draft_equals_verifier(family)
    plain = greedy_reference(family, [7, 8, 9], 5, 60)
    # The first token whose first occurrence is past the first few rounds.
    at = next(i for i in range(24, 60) if plain.index(plain[i]) == i)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    params = SamplingParams(max_new_tokens=60, greedy=True, stop=[f" w{plain[at]}"] if end == "stop string" else [],
                            stop_token_ids=[plain[at]] if end == "stop token" else [])
    if end == "eos":
        family.config.eos_token_id = plain[at]
    engine = Engine(family, max_batch_size=1, max_seq_len=96, tokenizer=tokenizer)
    _fixed_costs(engine, {})
    result = engine.generate([[7, 8, 9]], member=5, params=params, speculative=True)[0]
    assert result.finish_reason == "stop" and result.drafted > at // 2
    if end == "stop string":
        assert result.text == tokenizer.decode(plain[:at])
    else:
        assert result.token_ids == plain[:at + 1]
