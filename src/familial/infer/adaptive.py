"""Adaptive early exit: each token of each sequence stops at the first confident exit.

Confidence is the softmax top-1 probability ("top1") or the gap between the two most likely
tokens ("margin") at an exit, compared with that exit's threshold. Thresholds live in the
checkpoint as `config.runtime["early_exit"]`:
    {"metric": "top1", "thresholds": {"<exit>": 0.93, ...}, "target": 0.9, ...}
written by `familial calibrate`. Uncalibrated families use DEFAULT_THRESHOLD at every exit.
A request's depth budget (a cap on average depth as a fraction of the layers) forces an exit
whenever going deeper would lift the running average above the cap.
The runner supplies the skipped layers' KV (CALM-style copying, see familial.infer.runner).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from familial.config import ConfigError, FamilyConfig

METRICS = ("top1", "margin")
DEFAULT_THRESHOLD = 0.9


def confidence(logits: torch.Tensor, metric: str) -> torch.Tensor:
    """(..., vocab) logits -> (...) confidence under `metric`."""
    probs = torch.softmax(logits.float(), dim=-1)
    if metric == "top1":
        return probs.max(dim=-1).values
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@dataclass
class ExitPolicy:
    metric: str
    thresholds: dict[int, float]

    @classmethod
    def from_config(cls, config: FamilyConfig) -> ExitPolicy:
        settings = config.runtime.get("early_exit") or {}
        where = "family.json: runtime.early_exit"
        if not isinstance(settings, dict):
            raise ConfigError(f"{where} = {settings!r}: expected an object")
        metric = settings.get("metric", "top1")
        if metric not in METRICS:
            raise ConfigError(f"{where}.metric = {metric!r}: expected one of {', '.join(METRICS)}")
        raw = settings.get("thresholds", {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}.thresholds = {raw!r}: expected an object exit -> threshold")
        thresholds = {e: DEFAULT_THRESHOLD for e in config.exits[:-1]}
        for key, value in raw.items():
            if not str(key).isdigit() or int(key) not in thresholds:
                raise ConfigError(f"{where}.thresholds: key {key!r} is not an early exit "
                                  f"{config.exits[:-1]}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.thresholds[{key}] = {value!r}: expected a number")
            thresholds[int(key)] = float(value)
        return cls(metric, thresholds)


class AdaptiveState:
    """One sequence's early-exit decisions, with its running depth for a budget."""

    def __init__(self, config: FamilyConfig, policy: ExitPolicy, budget: float | None = None) -> None:
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget <= 1):
            raise ValueError(f"budget = {budget!r}: expected a fraction of the layers in (0, 1]")
        self.config, self.policy, self.budget = config, policy, budget
        self.depth_sum = 0
        self.tokens = 0

    def decide(self, exit_layer: int, logits: torch.Tensor) -> bool:
        threshold = self.policy.thresholds[exit_layer]
        if float(confidence(logits, self.policy.metric)) >= threshold:
            return True
        if self.budget is None:
            return False
        deeper = self.config.exits[self.config.exits.index(exit_layer) + 1]
        cap = self.budget * self.config.num_hidden_layers
        return (self.depth_sum + self.config.member_layers(deeper)) / (self.tokens + 1) > cap

    def record(self, exit_layer: int) -> None:
        self.depth_sum += self.config.member_layers(exit_layer)
        self.tokens += 1
