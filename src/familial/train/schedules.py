"""Schedules as data: per-exit loss weights lambda_k(t) and the learning rate.

Both are pure functions of the step, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import math

from familial.config import ConfigError
from familial.train.config import LRConfig, WeightSchedule


def _progress(step: int, start: int, end: int) -> float:
    if end <= start:
        return 0.0 if step < start else 1.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def weight_at(schedule: float | WeightSchedule, step: int) -> float:
    """The weight at `step` (0-based optimizer step).

    constant: `value`. linear / cosine: `start` until start_step, then to `end` at end_step,
    held after. warm_decay (warm deep supervision that decays): `start` is held for the
    warm phase [0, start_step), then decays geometrically to `end` at end_step (by equal
    factors per step, so a shallow exit's pull fades fast at first and slowly later).
    """
    if isinstance(schedule, (int, float)):
        return float(schedule)
    kind = schedule.kind
    if kind == "constant":
        return schedule.value
    t = _progress(step, schedule.start_step, schedule.end_step)
    if kind == "linear":
        return schedule.start + (schedule.end - schedule.start) * t
    if kind == "warm_decay" and schedule.start > 0 and schedule.end > 0:
        return schedule.start * (schedule.end / schedule.start) ** t
    if kind == "warm_decay":
        return schedule.start + (schedule.end - schedule.start) * t
    if kind == "cosine":
        return schedule.end + (schedule.start - schedule.end) * 0.5 * (1 + math.cos(math.pi * t))
    raise ConfigError(f"unknown weight schedule kind {kind!r}")


def lr_at(config: LRConfig, step: int, total_steps: int) -> float:
    """Learning rate at `step` of a stage with `total_steps` steps.

    Linear warmup over warmup_steps, then cosine to min_lr over the rest ("cosine"), a flat
    phase followed by a decay over the last decay_fraction of the steps ("wsd",
    warmup-stable-decay), or flat ("constant").
    """
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.kind == "constant":
        return config.lr
    if config.kind == "cosine":
        t = _progress(step, config.warmup_steps, total_steps - 1)
        return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    decay_steps = max(int(round(total_steps * config.decay_fraction)), 1)
    decay_start = max(total_steps - decay_steps, config.warmup_steps)
    if step < decay_start:
        return config.lr
    t = _progress(step, decay_start, total_steps - 1)
    if config.decay_shape == "linear":
        return config.lr + (config.min_lr - config.lr) * t
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
