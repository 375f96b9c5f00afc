"""The benchmark's --check catches an injected regression and passes without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.slow import DELAY_ENV, DelayMiddleware

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]


def suite(tmp: Path, name: str, *extra: str, delay_ms: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), DELAY_ENV: str(delay_ms)}
    slow = [f"--guard-server-arg=--middleware={DelayMiddleware.__module__}.DelayMiddleware"
            ] if delay_ms else []
    return subprocess.run([sys.executable, "-m", "benchmarks", "--configs", "masking",
                           "--no-components", "--out", str(tmp / name),
                           "--baseline", str(tmp / "baseline.json"), "--tolerance", "1.0",
                           "--check-metrics", "c1_ttft_p50_ms,c1_e2e_p50_ms",
                           *slow, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_check_fails_on_injected_sleep_and_passes_without(tmp_path):
    first = suite(tmp_path, "a", "--write-baseline")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert (tmp_path / "a" / "suite-tiny-quick.json").exists()
    ok = suite(tmp_path, "b", "--check")
    assert ok.returncode == 0 and "check: passed" in ok.stdout, ok.stdout[-2000:]
    slow = suite(tmp_path, "c", "--check", delay_ms=1500)
    assert slow.returncode == 1 and "REGRESSION: masking.c1_ttft_p50_ms" in slow.stdout, \
        slow.stdout[-2000:]
