"""Shared fixtures (tiny random Qwen3 checkpoints written by the tests themselves) and the
suite's skip policy.

Tests marked `reference` compare against a stock implementation (transformers, vLLM,
lm-eval, megatron-core, llama.cpp) or need an external tool (Chromium) that scripts/test.sh
installs. On a developer's machine such a test may skip when its tool is missing (pytest
prints every skip with its reason: `-rfEs` in pyproject's addopts). Under CI (`CI=true`) a
skipped reference test fails the run instead, with the skip's reason, so a failed install
cannot pass unseen.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hf_checkpoints import write_tiny_hf

# The suite's models are tiny: their steps are dispatch-bound, and a second intra-op thread
# only spins against the other processes on CI's 2 cores (several times slower under load).
torch.set_num_threads(1)

CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # (An expected failure is reported as skipped too, carrying `wasxfail`: not a skip.)
    if CI and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("reference"):
        report.outcome = "failed"
        report.longrepr = (f"reference test skipped under CI=true (its stock implementation or tool "
                           f"must be installed; see scripts/test.sh): {skip_reason(report)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A module-level skip would hide its reference tests before they are items; under CI only
    # a test may skip, never a whole module (the policy above then sees it).
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped under CI=true (skip inside the test instead): {skip_reason(report)}"


@pytest.fixture
def tiny_hf(tmp_path) -> Path:
    return write_tiny_hf(tmp_path / "dense")


def pytest_configure(config):
    # Registered here as well as (on other branches) in pyproject: a second registration of
    # the same marker is harmless.
    config.addinivalue_line("markers", "reference: compares against a stock implementation or needs "
                                       "an external tool (transformers, vLLM, llama.cpp)")
