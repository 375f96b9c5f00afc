"""The vllm-guard console script fails clearly on bad input."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_guard.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_serve_missing_model_path_is_one_line_error(tmp_path):
    missing = tmp_path / "no-such-model"
    out = run("serve", str(missing), "--port", "8123")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_serve_missing_model_flag_form(tmp_path):
    out = run("serve", "--model", str(tmp_path / "nope"))
    assert out.returncode != 0 and "nope" in out.stderr and "Traceback" not in out.stderr


def test_unknown_subcommand():
    out = run("frobnicate")
    assert out.returncode == 2
    assert "invalid choice: 'frobnicate'" in out.stderr and "Traceback" not in out.stderr


def test_serve_forwards_arguments_unchanged(tmp_path):
    from vllm_guard.cli import guard_env, server_argv

    argv = server_argv([str(tmp_path), "--max-model-len", "64", "--port=9", "--enforce-eager"])
    assert argv[1:] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path),
                        "--max-model-len", "64", "--port=9", "--enforce-eager",
                        "--host", "127.0.0.1"]
    env = guard_env({"VLLM_PLUGINS": "other"})
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0" and env["VLLM_PLUGINS"] == "other,vllm_guard"
