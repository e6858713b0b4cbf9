"""Fixtures of the reliability tests (helpers live in faults.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from faults import write_counting_shards  # noqa: E402


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_counting_shards(tmp_path / "shards")
