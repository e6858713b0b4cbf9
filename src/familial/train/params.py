"""Which parameters train, and how: the freeze rule, AdamW's groups, the learning rate.

One rule for every layout: a layout's parts keep the family's parameter names, so the same
patterns freeze the same parameters in one process and on every rank of a parallel run.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

import torch
from torch import nn

from familial.config import ConfigError
from familial.train.config import OptimConfig


def matches(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch patterns on parameter names; "re:<regex>" for a regular expression."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def check_patterns(patterns: Iterable[str], names: list[str], where: str = "freeze") -> None:
    for pattern in patterns:
        if not any(matches(name, [pattern]) for name in names):
            raise ConfigError(f"train config: field '{where}' pattern {pattern!r} matches no parameter")


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze parameters matching `patterns`, unfreeze all others; returns the frozen names.

    A pipeline stage holds only some of the family's parameters, so a pattern matching
    nothing here is not an error (the trainer checks patterns against the whole family).
    """
    frozen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not matches(name, patterns))
        if not parameter.requires_grad:
            frozen.append(name)
    return frozen


def decays(parameter: torch.Tensor) -> bool:
    """Matrices take weight decay; norms and biases do not."""
    return parameter.dim() >= 2


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over every parameter (frozen ones have no gradient, so AdamW leaves them alone).

    Group 0 holds the matrices, group 1 the rest, each in `named_parameters` order: the
    order a one-process checkpoint's optimizer state is indexed by.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        (decay if decays(parameter) else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over weights, gradients and moments) where the parameters are
    # plain tensors; sharded ones (DTensor) take the default implementation.
    fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused or None)


def optimizer_order(shapes: dict[str, list[int]]) -> list[str]:
    """Parameter names in the index order of `build_optimizer`'s state (from the family's shapes)."""
    names = list(shapes)
    return [n for n in names if len(shapes[n]) >= 2] + [n for n in names if len(shapes[n]) < 2]


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
