# The two commands a newcomer needs:
#   make demo   set everything up, build the demo model, serve it on 127.0.0.1:8000
#   make test   set everything up and run the whole test suite (what CI runs)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# setup installs without .pyc files; Python writes each module's once, on first import
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test lint bench efficacy
setup:
	scripts/setup.sh

demo: setup
	.venv/bin/vllm-guard demo

test: setup
	scripts/run_tests.sh

lint: setup
	.venv/bin/ruff check vllm_guard benchmarks harness tests

bench: setup
	.venv/bin/python -m benchmarks

efficacy: setup
	.venv/bin/python -m benchmarks.efficacy
