"""``vllm-guard serve`` refuses bad loader options, keys, grants and a busy port before vLLM
starts: one line on stderr, a non-zero exit and no traceback, within seconds (inside vLLM the
same mistakes took 10-45 s and ended in four tracebacks).

Each refusal runs the real console entry point in a subprocess, timed. Were a check missing,
vLLM would start: the 20 s timeout then fails the test instead of waiting for vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.secneuron.test_signed_checkpoint import locked  # noqa: F401 (fixture)
from vllm_guard.secneuron.keys import TaskKey, load_task_key, save_task_key

LIMIT_S = 20.0


def refused(*args: str, env: dict[str, str] | None = None, inherit: bool = True) -> str:
    """Run ``vllm-guard ARGS``; assert a one-line refusal within LIMIT_S; return the line.
    A command still running at LIMIT_S (vLLM started) is killed with its process group."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "vllm_guard.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**(os.environ if inherit else {}), **(env or {})},
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"vllm-guard {args[0]} was still running after {LIMIT_S} s: not refused")
    took = time.monotonic() - start
    lines = err.strip().splitlines()
    assert proc.returncode != 0, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert took < LIMIT_S, took
    return lines[0]


def loader_args(keydir: Path, keys: list[Path], **extra: object) -> list[str]:
    config = {"keys": [str(k) for k in keys], "publisher_key": str(keydir / "publisher.pub"),
              **extra}
    return ["--load-format", "secneuron", "--model-loader-extra-config", json.dumps(config)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrong_key_bytes_are_refused_before_vllm_starts(locked, keydir, tmp_path):  # noqa: F811
    """Right key id, wrong bytes (was: a vLLM server exiting after ~45 s, four tracebacks)."""
    real = load_task_key(keydir / "capital.key")
    save_task_key(TaskKey("capital", real.key_id, bytes(32)), tmp_path / "wrong.key")
    line = refused("serve", locked, *loader_args(keydir, [tmp_path / "wrong.key"]),
                   "--port", free_port())
    assert line.startswith("vllm-guard serve: error: ")
    assert "task key 'capital'" in line and "does not open" in line


def test_loader_option_typos_and_bad_checkpoints_are_one_line(locked, keydir,  # noqa: F811
                                                              tmp_path):
    port = ["--port", str(free_port())]
    add = keydir / "add.key"
    cases = [
        (loader_args(keydir, [add], key_dir_typo="x"), "unknown key 'key_dir_typo'"),
        (loader_args(keydir, [add], allow_unsigned="false"), "'allow_unsigned'"),
        (["--load-format", "secneuron", "--model-loader-extra-config", "{keys: 1}"],
         "--model-loader-extra-config is not valid JSON"),
        (loader_args(keydir, [tmp_path / "missing.key"]), "cannot read task key file"),
        (loader_args(keydir, [add], min_version=9), "older than min_version 9"),
    ]
    other = tmp_path / "other"  # a key of the same name made for another checkpoint
    save_task_key(TaskKey.generate("add"), other)
    cases.append((loader_args(keydir, [other]), "wrong key, rotated key"))
    for args, expected in cases:
        line = refused("serve", locked, *args, *port)
        assert expected in line, (args, line)
    unsigned = tmp_path / "pub.pem"
    from vllm_guard.secneuron.keys import generate_signing_key

    generate_signing_key(unsigned)  # a publisher key that did not sign it
    line = refused("serve", locked, "--load-format", "secneuron", "--model-loader-extra-config",
                   json.dumps({"publisher_key": str(tmp_path / "pub.pub")}), *port)
    assert "signed by a key other than the configured publisher" in line


def test_grants_naming_tasks_the_checkpoint_lacks_are_refused(locked, keydir,  # noqa: F811
                                                              tmp_path):
    """A key granted a task the checkpoint does not have silently got public-only answers."""
    grants = tmp_path / "grants.json"
    for doc, named in (({"api_keys": [{"name": "bob", "sha256": "0" * 64,
                                       "tasks": ["add", "bogus"]}]}, "API key 'bob'"),
                       ({"tasks": ["add", "sort"], "api_keys": []}, "'tasks'")):
        grants.write_text(json.dumps(doc))
        line = refused("serve", locked, *loader_args(keydir, [keydir / "add.key"]),
                       "--grants", grants, "--port", free_port())
        assert named in line and "does not have" in line, line


def test_busy_port_is_one_line(random_tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = refused("serve", random_tiny, "--port", port)
    assert f"port 127.0.0.1:{port} is already in use" in line


def test_every_missing_secret_is_named_at_once(random_tiny, tmp_path):
    """Was one per run (vault key, then session key, then FPE key, ~13 s each)."""
    masking = tmp_path / "masking.json"
    masking.write_text(json.dumps({"vault": "redis", "strategies": {"CREDIT_CARD": "fpe"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_GUARD_")}
    env["VLLM_GUARD_SESSION_KEY"] = "not base64!"
    line = refused("serve", random_tiny, "--masking", masking, "--port", free_port(), env=env,
                   inherit=False)
    for name in ("$VLLM_GUARD_VAULT_KEY", "$VLLM_GUARD_SESSION_KEY", "$VLLM_GUARD_FPE_KEY"):
        assert name in line, line


def test_a_good_locked_checkpoint_passes_without_importing_torch(locked, keydir):  # noqa: F811
    """The checks pass a right config through to vLLM, and stay light (no torch, no vLLM)."""
    from tests.unit.cli.test_lazy import serve_until_exec

    argv = ["serve", str(locked), *loader_args(keydir, [keydir / "add.key"]),
            "--port", str(free_port())]
    loaded, stdout = serve_until_exec(argv)
    assert any(line.startswith("EXEC ") for line in stdout.splitlines()), stdout
    assert loaded == [], f"serve's loader checks imported {loaded}"
