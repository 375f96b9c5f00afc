"""Shared fixtures: cached fixture models and real vLLM servers on loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.fixtures import fixture_model
from tests.support.server import VllmServer, free_port, post

LOG_DIR = Path(__file__).resolve().parents[1] / ".cache" / "test-logs"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return fixture_model("tiny")


def start_server(name: str, model: str | Path, args: list[str] | None = None,
                 guard: bool = True, env: dict[str, str] | None = None) -> VllmServer:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return VllmServer(str(model), list(args or []), LOG_DIR / f"{name}.log", dict(env or {}),
                      guard).start()


def stream(url: str, body: dict, timeout: float = 120) -> list[dict]:
    """POST with stream=true; return the parsed SSE data events (without [DONE])."""
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    events, done = [], False
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert done, "stream ended without data: [DONE]"
    return events


def complete(server: VllmServer, prompt: str, max_tokens: int = 8) -> str:
    status, body = post(server.url + "/v1/completions",
                        {"model": "test", "prompt": prompt, "max_tokens": max_tokens,
                         "temperature": 0})
    assert status == 200, body
    return body["choices"][0]["text"]


@pytest.fixture(scope="module")
def keydir(tmp_path_factory) -> Path:
    """Task keys for add, capital and reverse, and a publisher signing key."""
    from vllm_guard.secneuron.keys import KeyDir

    return KeyDir.create(tmp_path_factory.mktemp("keys"), ("add", "capital", "reverse")).root


# --- real redis-server ---------------------------------------------------------------------


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        for _ in range(100):
            try:
                redis.Redis(port=self.port).ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self):
        import redis

        return redis.Redis(port=self.port)


@pytest.fixture(scope="module")
def redis_server():
    r = Redis().start()
    yield r
    r.stop()
