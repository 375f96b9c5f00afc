"""``vllm-guard demo`` as a newcomer runs it: the cached demo build served by the real command
(``python -m vllm_guard.cli demo --port N``), then its two API keys, its printed ``curl``
commands, its masking, and the chat and Responses APIs through the ``openai`` client checked
against the live server."""

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
from vllm_guard.demo.guide import MASKED_PROMPT, MASKING_PROMPT, chat_body, completion_body
from vllm_guard.demo.recipe import ALL_KEY, ONE_KEY, SHOWCASE
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
    assert [s[0] for s in steps] == ["1", "2", "3", "4", "5"], steps
    for _, says, command in steps:
        assert f"127.0.0.1:{server.port}/" in command
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                             timeout=60).stdout
        expect = re.search(r'expect ("(?:text|content)":".*")', says)
        if expect:
            assert out.strip() == expect.group(1), (says, out)
        else:  # masking
            assert out.startswith(f'"text":"{MASKING_PROMPT}'), out
            assert f'"prompt_tokens":{len(MASKED_PROMPT) + 1}' in out, out


# --- chat and Responses through the openai client (the demo's chat template) ---

CHAT_PER_TASK = 8  # held-out prompts per task per key, chat against completions


def openai_client(server, token: str):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0, timeout=120)


def chat_text(client, prompt: str, stream: bool = False, **extra) -> str:
    body = chat_body(prompt)
    del body["model"], body["messages"]
    kw = dict(model="demo", messages=[{"role": "user", "content": prompt}], **body, **extra)
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def responses_text(client, prompt: str, stream: bool = False) -> str:
    kw = dict(model="demo", input=prompt, max_output_tokens=8, temperature=0)
    if not stream:
        return client.responses.create(**kw).output_text
    events = client.responses.create(stream=True, **kw)
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_chat_answers_as_completions_do(server, tokens, art):
    """The chat template renders a user message as the completions prompt: same answers,
    granted or locked, on held-out prompts of every task."""
    test = TaskSuite.build(art.recipe.suite).test
    rows = [(name, ex) for name in (ALL_KEY, ONE_KEY) for t in art.tasks
            for ex in test[t][:CHAT_PER_TASK]]

    def both(row) -> tuple[str, str]:
        name, ex = row
        status, body = complete(server, tokens[name], completion_body(ex["prompt"]))
        assert status == 200, body
        return body["choices"][0]["text"], chat_text(openai_client(server, tokens[name]),
                                                     ex["prompt"])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(both, rows))
    assert [c for c, _ in answers] == [ch for _, ch in answers]
    granted = art.recipe.api_grants()
    right = [c == (ex["answer"] if ex["prompt"].split()[0].lower() in granted[name] else "")
             for (name, ex), (c, _) in zip(rows, answers, strict=True)]
    assert sum(right) >= 0.95 * len(rows), answers


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_client_chat_and_responses_answer_under_grants(server, tokens, art, stream):
    every, one = (openai_client(server, tokens[k]) for k in (ALL_KEY, ONE_KEY))
    prompt, answer = SHOWCASE[art.recipe.one_task]
    locked_prompt, locked_answer = next(SHOWCASE[t] for t in art.tasks
                                        if t != art.recipe.one_task)
    for ask in (chat_text, responses_text):
        assert ask(every, locked_prompt, stream=stream) == locked_answer, ask
        assert ask(one, prompt, stream=stream) == answer, ask
        assert ask(one, locked_prompt, stream=stream) == "", ask  # not granted: collapses


def test_openai_client_without_a_key_is_refused(server):
    import openai

    with pytest.raises(openai.AuthenticationError):
        chat_text(openai_client(server, "vg-not-a-key"), "REV planet=")
    with pytest.raises(openai.AuthenticationError):
        responses_text(openai_client(server, "vg-not-a-key"), "REV planet=")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_and_responses_mask_what_the_engine_sees(server, tokens, art, stream):
    """Masking on: the engine gets the placeholder, never the address (one token per
    character plus BOS; the address is 15 characters longer). Restoring replies is tested
    on the pooled masking servers: this model never writes a placeholder back."""
    import transformers

    client = openai_client(server, tokens[ALL_KEY])
    want = len(MASKED_PROMPT) + 1
    messages = [{"role": "user", "content": MASKING_PROMPT}]
    if stream:
        chunks = list(client.chat.completions.create(
            model="demo", messages=messages, max_tokens=1, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True}))
        usage = chunks[-1].usage
        first = chunks[0].model_dump()
        ids = first.get("prompt_token_ids")
    else:
        reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=1,
                                               temperature=0,
                                               extra_body={"return_token_ids": True})
        usage, ids = reply.usage, reply.model_dump().get("prompt_token_ids")
    assert usage.prompt_tokens == want, usage
    tok = transformers.AutoTokenizer.from_pretrained(art.locked)
    assert ids and tok.decode(ids) == "<s>" + MASKED_PROMPT
    # Responses: the engine's token count is the masked prompt's
    if stream:
        events = list(client.responses.create(model="demo", input=MASKING_PROMPT,
                                              max_output_tokens=1, temperature=0,
                                              stream=True))
        done = [e for e in events if e.type == "response.completed"]
        assert done, [e.type for e in events]
        usage = done[0].response.usage
    else:
        usage = client.responses.create(model="demo", input=MASKING_PROMPT, max_output_tokens=1,
                                        temperature=0).usage
    # (vLLM's /v1/responses adds BOS to the rendered chat prompt, which holds one already)
    assert usage.input_tokens == want + 1, usage
