"""Tiny families and an uncached reference decoder for the runtime tests."""

from __future__ import annotations

import pytest
import torch

from familial.config import FamilyConfig
from familial.model import FamilyModel


def make_family(seed: int = 0, **overrides) -> FamilyModel:
    torch.manual_seed(seed)
    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, exits=[1, 3, 5],
                  max_position_embeddings=256, rope_theta=10000.0)
    fields.update(overrides)
    model = FamilyModel(FamilyConfig(**fields)).eval()
    with torch.no_grad():
        # Larger weights than the init make logits peaked, so greedy ties cannot blur a test.
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(4.0)
    return model


@torch.no_grad()
def reference_greedy(model: FamilyModel, prompt: list[int], exit_layer: int, steps: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]), exits=[exit_layer])[exit_layer]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture
def family() -> FamilyModel:
    return make_family()


@pytest.fixture
def greedy_reference():
    return reference_greedy


@pytest.fixture(scope="session")
def family_factory():
    return make_family
