"""Shared fixtures: tiny random Qwen3 checkpoints written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_checkpoints import write_tiny_hf

torch.set_num_threads(2)


@pytest.fixture
def tiny_hf(tmp_path) -> Path:
    return write_tiny_hf(tmp_path / "dense")
