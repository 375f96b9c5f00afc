"""Shared fixtures: cached fixture models and real vLLM servers on loopback."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from vllm_guard.testing.fixtures import fixture_model
from vllm_guard.testing.server import VllmServer, post

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
