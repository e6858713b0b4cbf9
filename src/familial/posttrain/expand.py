"""Stabilised block expansion: deepen one member's branch without changing what it computes.

New decoder blocks are appended after the member's existing branch layers. Each block's
attention output projection and MLP down projection start at exactly zero, so both residual
updates add exactly 0 and the member's logits are bitwise unchanged; q/k/v/gate/up start
Gaussian (`init="random"`, the paper's choice) or as copies of the last existing branch layer
(`init="clone"`, the ablation). Which blocks are new is recorded in
`config.runtime["expansion"]`, so a saved family knows what to train next.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Literal

import torch
from torch import nn

from familial import checks
from familial.config import ConfigError, FamilyConfig
from familial.model import DecoderLayer, FamilyModel, RMSNorm

ZERO_INIT = ("self_attn.o_proj", "mlp.down_proj")
GAUSSIAN_INIT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "mlp.gate_proj", "mlp.up_proj")


def expand_member(model: FamilyModel, member: int | str, blocks: int,
                  init: Literal["random", "clone"] = "random", std: float | None = None,
                  seed: int = 0) -> list[str]:
    """Append `blocks` zero-output decoder blocks to `member`'s branch; return their names.

    Only a non-final member has a branch of its own: deepening the last member would mean
    adding trunk layers that every deeper exit runs. Other members' modules are not touched.
    """
    config = model.config
    exit_layer = config.resolve_member(member)
    if exit_layer == config.exits[-1]:
        raise ConfigError(f"member {member!r} is the final exit ({exit_layer}); only an early "
                          f"exit's own branch can be expanded (exits: {config.exits[:-1]})")
    checks.positive_int("blocks", blocks, error=ConfigError)
    checks.one_of("init", init, ("random", "clone"), "'random' or 'clone'", error=ConfigError)
    std = checks.positive_number("std", config.initializer_range if std is None else std, error=ConfigError)
    branch = model.branches[str(exit_layer)]
    neighbour = branch.layers[-1]
    if init == "clone" and any(not isinstance(m, nn.Linear) for m in _linears(neighbour).values()):
        raise ConfigError(f"the last branch layer of member {exit_layer} holds low-rank "
                          f"(compressed) matrices and cannot be cloned; merge them first "
                          f"(merge_low_rank) or use init='random'")
    reference = next(neighbour.parameters())
    depth = len(branch.layers)
    generator = torch.Generator().manual_seed(seed)
    names = []
    for offset in range(blocks):
        index = depth + offset
        layer = DecoderLayer(config, f"branches.{exit_layer}.layers.{index}")
        layer.to(device=reference.device, dtype=reference.dtype)
        _initialise(layer, neighbour, init, std, generator)
        branch.layers.append(layer)
        names.append(f"branches.{exit_layer}.layers.{index}")

    position = config.exits.index(exit_layer)
    depths = [config.branch_depth(e) for e in config.exits[:-1]]
    depths[position] = depth + blocks
    config.branch_layers = depths
    record = config.runtime.setdefault("expansion", {}).setdefault(
        str(exit_layer), {"first_new_layer": depth, "blocks": 0, "init": init})
    record["blocks"] += blocks
    config.validate()
    return names


def _linears(layer: DecoderLayer) -> dict[str, nn.Module]:
    return {name: layer.get_submodule(name) for name in ZERO_INIT + GAUSSIAN_INIT}


@torch.no_grad()
def _initialise(layer: DecoderLayer, neighbour: DecoderLayer, init: str, std: float,
                generator: torch.Generator) -> None:
    if init == "clone":
        layer.load_state_dict(neighbour.state_dict())
    else:
        for name in GAUSSIAN_INIT:
            linear = layer.get_submodule(name)
            # Sampled on the CPU in float32 so a seed gives the same block on any device/dtype.
            weight = torch.randn(linear.weight.shape, generator=generator) * std
            linear.weight.copy_(weight)
            if linear.bias is not None:
                linear.bias.zero_()
        for module in layer.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    for name in ZERO_INIT:
        linear = layer.get_submodule(name)
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()


def trainable_parameter_patterns(config: FamilyConfig, member: int | str,
                                 include_norm: bool = True) -> list[str]:
    """Glob patterns (fnmatch, on family parameter names) of what trains after expansion.

    The new blocks, the member's LM head and, with `include_norm`, its final norm (the norm
    directly scales what the head sees, and belongs to this member alone). A shared head
    belongs to every member, so it stays frozen and is not listed.
    """
    exit_layer = config.resolve_member(member)
    record = config.runtime.get("expansion", {}).get(str(exit_layer))
    if record is None:
        raise ConfigError(f"member {exit_layer} was never expanded (family.json has no "
                          f"runtime.expansion entry for it); run `familial expand` first")
    first, total = record["first_new_layer"], config.branch_depth(exit_layer)
    patterns = [f"branches.{exit_layer}.layers.{i}.*" for i in range(first, total)]
    if not config.shared_head:
        patterns.append(f"branches.{exit_layer}.lm_head.*")
    if include_norm:
        patterns.append(f"branches.{exit_layer}.norm.*")
    return patterns


def frozen_parameter_patterns(config: FamilyConfig, member: int | str,
                              include_norm: bool = True) -> list[str]:
    """The complement of `trainable_parameter_patterns`, as the trainer's `freeze` list.

    One "re:" pattern (a negative lookahead), since fnmatch cannot say "all but these".
    """
    prefixes = [re.escape(p[:-1]) for p in trainable_parameter_patterns(config, member, include_norm)]
    return [f"re:^(?!{'|'.join(prefixes)})"]


def freeze_except(model: nn.Module, patterns: list[str]) -> tuple[int, int]:
    """requires_grad only for parameters matching a pattern; returns (trainable, frozen) counts."""
    trainable = frozen = 0
    matched = set()
    for name, param in model.named_parameters():
        hits = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
        matched.update(hits)
        param.requires_grad_(bool(hits))
        if hits:
            trainable += param.numel()
        else:
            frozen += param.numel()
    unused = [p for p in patterns if p not in matched]
    if unused:
        raise ConfigError(f"trainable pattern(s) {unused} match no parameter of the model")
    return trainable, frozen
