#!/usr/bin/env bash
# Run the whole test suite (lint first: a ruff error fails the run).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check vllm_guard benchmarks tests
exec .venv/bin/python -m pytest -q "$@" tests
