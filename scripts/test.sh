#!/usr/bin/env bash
# The README's test command: builds a fresh virtual environment and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# torch is pinned here, not in pyproject: a looser range would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet "torch==2.13.0" -e ".[test]"
.venv/bin/python -m pytest -q "$@"
