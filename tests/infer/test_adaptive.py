"""Adaptive early exit per sequence, depth budgets, and calibrated thresholds in the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from familial.checkpoint_io import load_family, save_family
from familial.cli import main
from familial.config import FamilyConfig
from familial.infer import Engine, SamplingParams
from familial.infer.adaptive import ExitPolicy
from familial.infer.cache import SlotCache
from familial.infer.calibrate import NEVER, choose_threshold
from familial.infer.runner import Row, Runner

GREEDY = SamplingParams(max_new_tokens=12, greedy=True)


def _thresholds(family, value):
    family.config.runtime["early_exit"] = {"metric": "top1", "thresholds": {"1": value, "3": value}}


def test_threshold_zero_exits_first_and_above_one_never_exits(family, greedy_reference):
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44]]
    _thresholds(family, 0.0)
    engine = Engine(family, max_batch_size=4)
    # Adaptive rows share the batch with fixed-member rows.
    fixed = engine.submit([7, 7], member=3, params=GREEDY)
    for prompt, result in zip(prompts, engine.generate(prompts, member="auto", params=GREEDY)):
        assert result.token_ids == greedy_reference(family, prompt, 1, 12)
        assert set(result.exits) == {1}
    assert [e.token_id for e in fixed] == greedy_reference(family, [7, 7], 3, 12)
    _thresholds(family, 1.01)
    for prompt, result in zip(prompts, Engine(family).generate(prompts, member="auto", params=GREEDY)):
        assert result.token_ids == greedy_reference(family, prompt, 5, 12)
        assert set(result.exits) == {5}


def test_budget_caps_average_depth(family):
    _thresholds(family, 1.01)
    engine = Engine(family)
    for budget in (0.4, 0.6):
        result = engine.generate([[5, 6, 7]], params=SamplingParams(max_new_tokens=20, greedy=True),
                                 budget=budget)[0]
        depths = [family.config.member_layers(e) for e in result.exits]
        assert sum(depths) / len(depths) <= budget * family.config.num_hidden_layers
        assert len(set(result.exits)) > 1


def test_choose_threshold_is_the_lowest_meeting_the_target():
    scores = torch.tensor([0.6, 0.9, 0.7, 0.8])
    agree = torch.tensor([True, True, False, True])
    assert choose_threshold(scores, agree, 0.75) == (pytest.approx(0.6), 1.0)
    assert choose_threshold(scores, agree, 0.9) == (pytest.approx(0.8), 0.5)
    assert choose_threshold(scores, torch.zeros(4, dtype=torch.bool), 0.5) == (NEVER, 0.0)


def test_calibrate_command_writes_thresholds_into_family_json(family, tmp_path):
    from familial.data.shards import write_shards

    save_family(family, tmp_path / "family")
    rng = np.random.default_rng(0)
    write_shards(tmp_path / "held_out", [rng.integers(0, 97, 300) for _ in range(4)], vocab_size=97)
    assert main(["calibrate", str(tmp_path / "family"), "--data", str(tmp_path / "held_out"),
                 "--target", "0.5", "--seq-len", "64"]) == 0
    settings = json.loads((tmp_path / "family" / "family.json").read_text())["runtime"]["early_exit"]
    assert settings["metric"] == "top1" and settings["target"] == 0.5 and settings["tokens"] == 1152
    assert set(settings["thresholds"]) == {"1", "3"}
    assert sorted(p.name for p in (tmp_path / "family").iterdir()) == ["family.json", "model.safetensors"]
    policy = ExitPolicy.from_config(FamilyConfig.load(tmp_path / "family"))
    assert policy.thresholds == {int(e): t for e, t in settings["thresholds"].items()}
    engine = Engine(load_family(tmp_path / "family"))
    assert engine.generate([[1, 2]], member="auto", params=GREEDY)[0].finish_reason == "length"


def test_generate_command_streams_token_ids(family, tmp_path, capsys, greedy_reference):
    save_family(family, tmp_path / "family")
    assert main(["generate", str(tmp_path / "family"), "--prompt-ids", "1,2,3", "--member", "exit-3",
                 "--greedy", "--max-new-tokens", "6", "--speculative", "1"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    assert printed == greedy_reference(family, [1, 2, 3], 3, 6)
    assert main(["generate", str(tmp_path / "family"), "--prompt", "hello"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_copied_kv_is_exact_at_the_exit_layer_and_fills_deeper_layers(family):
    """Tokens exiting at exit 1 write K/V for the layers they skip; layer 1's is exact."""
    _thresholds(family, 0.0)
    engine = Engine(family, max_batch_size=1, max_seq_len=64)
    prompt = [1, 2, 3]
    result = engine.generate([prompt], member="auto", params=SamplingParams(max_new_tokens=8, greedy=True))[0]
    # The last generated token is never fed, so its KV is not in the cache.
    ids = prompt + result.token_ids[:-1]
    n, reference = len(ids), SlotCache(family.config, 1, 64)
    Runner(family, reference).forward([Row(0, 0, 5, length=n, extra_branches=frozenset({1, 3}))], tokens=ids)
    for name in ("layers.0", "branches.1.layers.0", "layers.1"):
        for ours, exact in ((engine.cache.keys, reference.keys), (engine.cache.values, reference.values)):
            torch.testing.assert_close(ours[name][0, :, :n], exact[name][0, :, :n], atol=1e-4, rtol=1e-4)
    for name in ("layers.3", "branches.3.layers.0", "layers.5"):
        copied = engine.cache.keys[name][0, :, len(prompt):n]
        assert copied.abs().sum() > 0
        assert not torch.allclose(copied, reference.keys[name][0, :, len(prompt):n], atol=1e-3)


def test_exit_is_decided_per_sequence_within_a_batch(family):
    """Two adaptive requests decoded together exit where each would alone."""
    _thresholds(family, 1.01)
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
