"""Self-speculative decoding keeps the verifier's output (greedy) and distribution (sampling)."""

from __future__ import annotations

import pytest
import torch

from familial.infer import Engine, SamplingParams
from familial.infer.cache import SlotCache
from familial.infer.runner import Row, Runner
from familial.infer.sampling import Sampler
from familial.infer.speculative import SpeculativeDecoder, verify_token

PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [60, 61, 62, 63, 64, 65, 66]]


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


def test_full_acceptance_grows_the_draft_and_rolls_back_nothing(family, greedy_reference):
    family = _draft_equals_verifier(family)
    runner = Runner(family, SlotCache(family.config, num_slots=1, max_len=96))
    prompt = [7, 8, 9]
    out = runner.forward([Row(0, 0, 5, extra_branches=frozenset({1}))], tokens=torch.tensor([prompt]))[0]
    generated = [int(out.logits[-1].argmax())]
    decoder = SpeculativeDecoder(runner, [1, 5], draft_length=2)
    sampler = Sampler(SamplingParams(greedy=True))
    pos = len(prompt)
    while len(generated) < 40:
        tokens = decoder.round(0, pos, generated[-1], prompt + generated, sampler, 40 - len(generated))
        pos += len(tokens)
        generated += tokens
    assert generated == greedy_reference(family, prompt, 5, 40)
    assert decoder.accepted == decoder.proposed and decoder.k[1] > 2


def test_rejection_sampling_keeps_the_verifier_distribution():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    sampler = Sampler(SamplingParams(seed=0))
    counts = torch.zeros(4)
    trials = 8000
    for _ in range(trials):
        drafted = sampler.draw(q)
        token, _ = verify_token(p, q, drafted, sampler)
        counts[token] += 1
    torch.testing.assert_close(counts / trials, p, atol=0.02, rtol=0)


def test_speculative_sampling_is_seeded(family):
    engine = Engine(family, max_batch_size=2)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, seed=11)
    first = engine.generate([[1, 2, 3]], member=5, params=params, speculative="cascade")[0]
    second = engine.generate([[1, 2, 3]], member=5, params=params, speculative="cascade")[0]
    assert first.token_ids == second.token_ids and len(first.token_ids) == 12
