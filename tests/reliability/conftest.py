"""Fixtures of the reliability tests (helpers live in faults.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from faults import write_counting_shards  # noqa: E402


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_counting_shards(tmp_path / "shards")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from a second intra-op thread, and on a shared 2-core
    # machine spinning threads slow every step by several times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
