"""Tiny families for post-training tests (hidden 64, 4 trunk layers, exits 1 and 3).

A plain module, not a conftest: `from conftest import ...` elsewhere in the suite must keep
finding the top-level tests/conftest.py.
"""

from __future__ import annotations

import torch

from familial.config import FamilyConfig
from familial.model import FamilyModel


def tiny_family(seed: int = 0, **overrides) -> FamilyModel:
    torch.manual_seed(seed)
    fields = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, exits=[1, 3],
                  max_position_embeddings=128, rope_theta=10000.0)
    fields.update(overrides)
    return FamilyModel(FamilyConfig(**fields))
