#!/usr/bin/env bash
# Run the whole test suite, all three tiers (lint first: a ruff error fails the run).
# Two xdist workers (pyproject's addopts): the server tier runs in one, the pipelines in
# the other, the unit tests fill in. Extra arguments go to pytest (e.g. --random-order).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset PYTHONDONTWRITEBYTECODE  # setup installs without .pyc files: write each once (setup.sh)
.venv/bin/ruff check vllm_guard benchmarks harness tests
exec .venv/bin/python -m pytest -q --durations=15 "$@" tests
