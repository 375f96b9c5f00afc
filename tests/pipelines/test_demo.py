"""``vllm-guard demo`` as a newcomer runs it: the cached demo build served by the real command
(``python -m vllm_guard.cli demo --port N``), then its two API keys, its printed ``curl``
commands and its masking checked against the live server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import harness.fixtures  # noqa: F401  (sets $VLLM_GUARD_CACHE to the checkout's .cache)
from harness.server import VllmServer, post
from tests.conftest import LOG_DIR
from vllm_guard.demo.build import DemoArtefacts, demo_artefacts
from vllm_guard.demo.guide import MASKED_PROMPT, MASKING_PROMPT, completion_body
from vllm_guard.demo.recipe import ALL_KEY, ONE_KEY
from vllm_guard.demo.tasks import TaskSuite

PER_TASK = 40  # held-out prompts per task per key
REPORT = Path(__file__).resolve().parents[2] / ".cache" / "reports" / "demo_scores.json"
ADDRESS = MASKING_PROMPT.split()[1].rstrip(",")


class DemoServer(VllmServer):
    """The ``vllm-guard demo`` command itself, on a free port."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm_guard.cli", "demo", "--port", str(self.port)]


@pytest.fixture(scope="module")
def art() -> DemoArtefacts:
    return demo_artefacts()  # built once (~2 min), then reused from .cache/demo


@pytest.fixture(scope="module")
def server(art):
    # guard=False: the environment is the caller's, as for a newcomer; the demo sets the rest
    srv = DemoServer("demo", log_path=LOG_DIR / "demo_server.log", guard=False)
    srv.start()
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def tokens(art) -> dict[str, str]:
    return {k.name: k.token for k in art.api_keys()}


def complete(server, token: str | None, body: dict) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return post(server.url + "/v1/completions", body, headers)


def served_accuracy(server, token: str, art: DemoArtefacts) -> dict[str, float]:
    """Exact match per task on held-out prompts, with the guide's request body (greedy,
    8 tokens): the text must be the answer and nothing more."""
    test = TaskSuite.build(art.recipe.suite).test

    def ask(ex: dict) -> bool:
        status, body = complete(server, token, completion_body(ex["prompt"]))
        assert status == 200, body
        return body["choices"][0]["text"] == ex["answer"]

    with ThreadPoolExecutor(16) as pool:
        return {t: sum(pool.map(ask, rows[:PER_TASK])) / PER_TASK for t, rows in test.items()}


@pytest.fixture(scope="module")
def scores(server, art, tokens) -> dict[str, dict[str, float]]:
    out = {name: served_accuracy(server, tokens[name], art) for name in (ALL_KEY, ONE_KEY)}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({"per_task": PER_TASK, "served": out,
                                  "build": art.summary()}, indent=1))
    return out


def test_all_tasks_key_answers_every_task(scores, art):
    assert set(scores[ALL_KEY]) == set(art.tasks)
    assert all(a >= 0.95 for a in scores[ALL_KEY].values()), scores


def test_one_task_key_answers_its_task_and_nothing_else(scores, art):
    (mine,) = art.recipe.api_grants()[ONE_KEY]
    for task, acc in scores[ONE_KEY].items():
        assert acc >= 0.95 if task == mine else acc <= 0.10, scores


def test_no_key_is_refused(server):
    status, body = complete(server, None, completion_body("REV planet="))
    assert status == 401, body


def test_masked_address_is_restored_and_never_reaches_the_engine(server, tokens, art):
    import transformers

    token = tokens[ALL_KEY]
    status, body = complete(server, token, completion_body(MASKING_PROMPT, max_tokens=1,
                                                           echo=True))
    assert status == 200, body
    assert body["choices"][0]["text"].startswith(MASKING_PROMPT)  # restored echo
    assert body["usage"]["prompt_tokens"] == len(MASKED_PROMPT) + 1  # characters + BOS
    # the prompt as the engine tokenized it (vLLM skips echo when token ids are asked for)
    status, body = complete(server, token, completion_body(MASKING_PROMPT, max_tokens=1,
                                                           return_token_ids=True))
    assert status == 200, body
    tok = transformers.AutoTokenizer.from_pretrained(art.locked)
    seen = tok.decode(body["choices"][0]["prompt_token_ids"], skip_special_tokens=True)
    assert seen == MASKED_PROMPT and ADDRESS not in seen
    # the guide printed at startup holds the address (in its curl); vLLM's own log must not
    vllm_log = server.log_text().split("Without an API key", 1)[1]
    assert "Application startup complete" in vllm_log and ADDRESS not in vllm_log


def test_printed_curl_commands_show_what_they_promise(server, tokens):
    """Run the guide's commands exactly as printed (the newcomer's copy and paste)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    log = server.log_text()
    assert all(t in log for t in tokens.values())
    steps = re.findall(r"^# (\d)\. (.*?)\n(?:#.*\n)*(curl .*)$", log, re.MULTILINE)
    assert [s[0] for s in steps] == ["1", "2", "3", "4"], steps
    for _, says, command in steps:
        assert f"127.0.0.1:{server.port}/" in command
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                             timeout=60).stdout
        expect = re.search(r'expect ("text":".*")', says)
        if expect:
            assert out.strip() == expect.group(1), (says, out)
        else:  # masking
            assert out.startswith(f'"text":"{MASKING_PROMPT}'), out
            assert f'"prompt_tokens":{len(MASKED_PROMPT) + 1}' in out, out
