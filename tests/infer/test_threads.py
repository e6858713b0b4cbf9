"""How many threads a serving engine's process takes."""

from __future__ import annotations

from familial import threads
from familial.config import FamilyConfig
from familial.infer.engine import suggested_threads


def config(hidden: int, layers: int) -> FamilyConfig:
    return FamilyConfig(vocab_size=128, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, num_key_value_heads=1, exits=[layers - 1])


def test_a_wide_member_gets_every_core_and_a_narrow_one_a_single_thread(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    # Depth does not make a product bigger: a shallow wide member splits as well as a deep one.
    assert suggested_threads(config(1024, 8)) == suggested_threads(config(576, 30)) == 2
    assert suggested_threads(config(512, 2)) == 2
    assert suggested_threads(config(256, 8)) == 1
    assert threads.serving_threads(256)[1] == "hidden 256 < 512: its products are too small to split"
