#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a bare GPU machine: PyTorch and Triton, no vLLM,
# no network, nothing installed. Run from anywhere; one JSON line on stdout. With $OUT set
# (the device tool), also $OUT/gpu_check.json and the log $OUT/gpu_check.log.
#   bash scripts/gpu_check.sh              # < 4 min on an H100; exit 1 when a check fails
#   bash scripts/gpu_check.sh --cpu-smoke  # the same code on CPU, Triton interpreted
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  # the log goes to the file and to stderr (the device tool returns the output's tail)
  timeout 280 "$PY" -m benchmarks.gpu_check --out "$OUT/gpu_check.json" "$@" \
    2> >(tee "$OUT/gpu_check.log" >&2)
else
  timeout 280 "$PY" -m benchmarks.gpu_check "$@"
fi
