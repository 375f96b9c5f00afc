"""The GPU check (``python -m benchmarks.gpu_check``) runs where only torch and Triton are
installed: its ``--cpu-smoke`` runs here, in a subprocess with vLLM, transformers, Presidio and
spaCy blocked (a package of each name that fails to import, first on the path), so the script
cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BLOCKED = ("vllm", "transformers", "presidio_analyzer", "presidio_anonymizer", "spacy")


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    for name in BLOCKED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked: the GPU machine has none')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    return env


def _python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_block_fails_an_import_of_vllm(tmp_path):
    """The blocker itself works: vLLM, and a product module that needs it, fail to import."""
    env = _blocked_env(tmp_path)
    for module in ("vllm", "vllm_guard.loader.secneuron_loader"):
        run = _python(env, "-c", f"import {module}")
        assert run.returncode != 0 and "vllm is blocked" in run.stderr, (module, run.stderr)


def test_the_kernel_module_imports_without_vllm(tmp_path):
    run = _python(_blocked_env(tmp_path), "-c",
                  "import sys, vllm_guard.kernels.masked_silu, benchmarks.gpu_check\n"
                  f"bad = [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}]\n"
                  "assert not bad, bad\n")
    assert run.returncode == 0, run.stderr[-3000:]


def test_cpu_smoke_runs_the_gpu_check_without_vllm(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "result.json"
    run = _python(_blocked_env(tmp_path), "-m", "benchmarks.gpu_check", "--cpu-smoke",
                  "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout[-2000:]  # one JSON line, everything else on stderr
    result = json.loads(lines[0])
    assert result == json.loads(out.read_text())
    assert result["mode"] == "cpu-smoke" and result["pass"] is True, result
    checks = result["checks"]
    # every check was shown a broken op and failed it
    assert checks["self_test"] == {"unmasked_caught": True, "wrong_values_caught": True,
                                   "baked_grants_caught": True, "pass": True}
    correct = checks["correctness"]
    assert correct["pass"] and correct["cases"] == 3 * 2 * 3 * 3 and not correct["failures"]
    assert correct["locked_elements_checked"] > 0
    assert checks["cuda_graph"]["pass"] and checks["cuda_graph"]["replays"] == 7
    assert checks["no_host_sync"]["pass"]
    bench = checks["throughput"]
    assert bench["pass"] is None and not bench["timed"]  # no verdict from CPU timings
    assert len(bench["rows"]) == 3 * 1 * 2 and not bench["skipped_for_time"]
    for row in bench["rows"]:
        for op in ("eager", "compiled", "triton"):
            assert row[op]["graph_gbps"] > 0 and row[op]["launch_gbps"] > 0, row
    assert checks["block_sweep"]["all_correct"] and checks["block_sweep"]["rows"]
