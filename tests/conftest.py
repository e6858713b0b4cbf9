"""Shared fixtures: tiny random Qwen3 checkpoints written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_checkpoints import write_tiny_hf

# The suite's models are tiny: their steps are dispatch-bound, and a second intra-op thread
# only spins against the other processes on CI's 2 cores (several times slower under load).
torch.set_num_threads(1)


@pytest.fixture
def tiny_hf(tmp_path) -> Path:
    return write_tiny_hf(tmp_path / "dense")


def pytest_configure(config):
    # Registered here as well as (on other branches) in pyproject: a second registration of
    # the same marker is harmless.
    config.addinivalue_line("markers", "reference: compares against a stock implementation or needs "
                                       "an external tool (transformers, vLLM, llama.cpp)")
