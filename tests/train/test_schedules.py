"""Loss-weight and learning-rate schedules give the configured values."""

from __future__ import annotations

import math

import pytest

from familial.config import FamilyConfig
from familial.train.config import LossConfig, LRConfig, WeightSchedule
from familial.train.loop import exit_weights
from familial.train.schedules import lr_at, weight_at


def test_weight_schedules():
    assert weight_at(0.7, 123) == 0.7
    assert weight_at(WeightSchedule(kind="constant", value=0.3), 10) == 0.3
    linear = WeightSchedule(kind="linear", start=1.0, end=0.2, start_step=10, end_step=30)
    assert [weight_at(linear, s) for s in (0, 10, 20, 30, 99)] == pytest.approx([1.0, 1.0, 0.6, 0.2, 0.2])
    cosine = WeightSchedule(kind="cosine", start=1.0, end=0.0, start_step=0, end_step=100)
    assert [weight_at(cosine, s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    assert weight_at(cosine, 25) == pytest.approx(0.5 * (1 + 2 ** -0.5))
    warm = WeightSchedule(kind="warm_decay", start=1.0, end=0.01, start_step=20, end_step=40)
    assert [weight_at(warm, s) for s in (0, 19, 20, 30, 40, 50)] == pytest.approx(
        [1.0, 1.0, 1.0, 0.1, 0.01, 0.01])


def test_lr_schedules():
    cosine = LRConfig(lr=1.0, min_lr=0.1, warmup_steps=4, kind="cosine")
    assert [lr_at(cosine, s, 14) for s in (0, 1, 3)] == pytest.approx([0.25, 0.5, 1.0])
    assert lr_at(cosine, 4, 14) == pytest.approx(1.0)
    assert lr_at(cosine, 13, 14) == pytest.approx(0.1)
    assert lr_at(cosine, 9, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    wsd = LRConfig(lr=1.0, min_lr=0.0, warmup_steps=2, kind="wsd", decay_fraction=0.25)
    values = [lr_at(wsd, s, 20) for s in range(20)]
    assert values[:2] == pytest.approx([0.5, 1.0])
    assert values[2:15] == [1.0] * 13  # stable until the last 25% (5 steps)
    assert values[15:] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_at(LRConfig(lr=0.3, kind="constant"), 7, 10) == 0.3


def test_exit_weights_by_index_and_alias():
    config = FamilyConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                          num_attention_heads=2, num_key_value_heads=1, exits=[1, 2, 3],
                          member_names={"small": 1})
    loss = LossConfig(lambdas={"small": WeightSchedule(kind="linear", start=1.0, end=0.0, end_step=10),
                               "exit-2": 0.5},
                      default_lambda=0.9, distill={"1": 0.2, "3": 1.0})
    lambdas, distill = exit_weights(loss, config, 5)
    assert lambdas == pytest.approx({1: 0.5, 2: 0.5, 3: 0.9})
    assert distill == {1: 0.2}  # the deepest exit is the teacher, never a student
    with pytest.raises(ValueError, match="loss.lambdas.*'tiny'"):
        exit_weights(LossConfig(lambdas={"tiny": 1.0}), config, 0)
