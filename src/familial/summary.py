"""What a family holds: members, their sizes, and what sharing saves."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from familial.config import FamilyConfig
from familial.model import FamilyModel

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemberSummary:
    exit: int
    name: str
    layers: int
    parameters: int
    # excludes the token embedding and the LM head, the usual "non-embedding" count.
    non_embedding_parameters: int


@dataclass
class FamilySummary:
    exits: list[int]
    members: list[MemberSummary]
    family_parameters: int
    separate_parameters: int
    bytes_per_parameter: int

    @property
    def saved_bytes(self) -> int:
        return (self.separate_parameters - self.family_parameters) * self.bytes_per_parameter

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(family_bytes=self.family_parameters * self.bytes_per_parameter,
                    separate_bytes=self.separate_parameters * self.bytes_per_parameter,
                    saved_bytes=self.saved_bytes)
        return data


def summarize(config: FamilyConfig) -> FamilySummary:
    """Count parameters on the meta device, so a 14B family costs no memory to describe."""
    with torch.device("meta"):
        family = FamilyModel(FamilyConfig.from_dict(config.to_dict()))
    members = []
    for e in config.exits:
        member = family.member(e)
        total = sum(p.numel() for p in member.parameters())
        # A compressed (low-rank) head holds two matrices, so collect parameters, not .weight.
        embedding = {id(p) for p in (*member.model.embed_tokens.parameters(),
                                     *member.lm_head.parameters())}
        non_embedding = total - sum(p.numel() for p in member.parameters() if id(p) in embedding)
        members.append(MemberSummary(e, config.member_name(e), config.member_layers(e), total,
                                     non_embedding))
    family_total = sum(p.numel() for p in family.parameters())
    return FamilySummary(list(config.exits), members, family_total,
                         sum(m.parameters for m in members), DTYPE_BYTES[config.torch_dtype])


def format_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def format_summary(summary: FamilySummary) -> str:
    lines = [f"{'member':<12} {'exit':>5} {'layers':>7} {'params':>10} {'non-embedding':>14}"]
    for m in summary.members:
        lines.append(f"{m.name:<12} {m.exit:>5} {m.layers:>7} {format_count(m.parameters):>10} "
                     f"{format_count(m.non_embedding_parameters):>14}")
    lines.append(f"family total: {format_count(summary.family_parameters)} parameters "
                 f"({format_bytes(summary.family_parameters * summary.bytes_per_parameter)})")
    lines.append(f"members stored separately: {format_count(summary.separate_parameters)} parameters "
                 f"({format_bytes(summary.separate_parameters * summary.bytes_per_parameter)})")
    lines.append(f"serving the family saves {format_bytes(summary.saved_bytes)}")
    return "\n".join(lines)
