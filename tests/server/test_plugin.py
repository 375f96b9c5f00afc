"""Foundation: a real vLLM server loads vllm-guard in every process and answers (the shared
compiled grants server, which keeps vLLM's default worker process, with a key granting every
task: the unlocked model's answers)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness.fixtures import format_example
from harness.server import post
from tests.conftest import stream
from tests.servers import bearer

ALL = bearer("all")


@pytest.fixture
def server(grants_compiled):
    return grants_compiled


def test_registration_line_in_every_process(server):
    log = server.log_text()
    for role in ("api_server", "engine_core", "worker"):
        assert f"vllm-guard 0.1.0 registered in {role}" in log, f"no line for {role}"
    # once per process, not once per call
    assert log.count("registered in worker") == 1


def test_completions_and_chat_answer(server):
    status, body = post(server.url + "/v1/completions", {
        "model": "test", "prompt": format_example("capital of Japan"), "max_tokens": 4,
        "temperature": 0}, ALL)
    assert status == 200 and body["choices"][0]["text"].startswith("Tokyo")
    status, body = post(server.url + "/v1/chat/completions", {
        "model": "test", "messages": [{"role": "user", "content": "capital of France"}],
        "max_tokens": 4, "temperature": 0}, ALL)
    assert status == 200 and body["choices"][0]["message"]["content"] == "Paris"


def test_streamed_chat_and_completion(server):
    events = stream(server.url + "/v1/chat/completions", {
        "model": "test", "messages": [{"role": "user", "content": "capital of Italy"}],
        "max_tokens": 4, "temperature": 0}, headers=ALL)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == "Rome"
    events = stream(server.url + "/v1/completions", {
        "model": "test", "prompt": format_example("capital of Egypt"), "max_tokens": 4,
        "temperature": 0}, headers=ALL)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]).startswith("Cairo")


@pytest.mark.parametrize(("plugins", "expect"), [("some_other_plugin", False),
                                                 ("vllm_guard", True)])
def test_vllm_plugins_allow_list(plugins, expect):
    """vLLM's own plugin loader honours VLLM_PLUGINS: with another name, we stay out."""
    code = "from vllm.plugins import load_general_plugins; load_general_plugins()"
    env = {**os.environ, "VLLM_PLUGINS": plugins}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert ("vllm-guard 0.1.0 registered in" in out.stderr + out.stdout) is expect
