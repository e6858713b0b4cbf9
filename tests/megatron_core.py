"""megatron-core's own indexed-dataset module, for the tests that compare against files it writes."""

from __future__ import annotations

import warnings

import pytest

try:
    with warnings.catch_warnings():   # "Transformer Engine and Apex are not installed"
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset as indexed
except ImportError:
    indexed = None


@pytest.fixture(autouse=True)
def megatron_core():
    """Without megatron-core a test skips saying why (its module is marked reference, so under
    CI the skip fails the run: tests/conftest.py)."""
    if indexed is None:
        pytest.skip("megatron-core is not installed (scripts/test.sh installs it with --no-deps)")
