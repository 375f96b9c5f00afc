"""Masking behind a real vLLM server with a real redis-server (the shared grants and
Redis-vault masking server, as tenant alice): the engine sees placeholders only, sessions,
refused routes, 4xx, and failing closed when Redis goes down."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import masking_client
from harness.masking_client import engine_prompt, sse_text
from harness.server import post
from tests.servers import SECRETS, bearer
from vllm_guard.masking.fields import ROUTES
from vllm_guard.masking.middleware import BODYLESS_POSTS
from vllm_guard.masking.vault import InMemoryVault, RedisVault

VAULT_KEY = SECRETS["VLLM_GUARD_VAULT_KEY"]
ALICE = bearer("alice")


def echo(server, prompt: str, **kw) -> tuple:
    return masking_client.echo(server, prompt, headers=ALICE, **kw)


# --- vaults --------------------------------------------------------------------------------


def test_vaults_consistent_placeholders_and_redis_holds_no_plaintext(redis_server):
    async def go():
        for vault in (InMemoryVault(ttl_seconds=60, max_sessions=2),
                      RedisVault(redis_server.url, base64.b64decode(VAULT_KEY), 60)):
            a = await vault.assign("s", "EMAIL_ADDRESS", "secret.person@corp.example")
            b = await vault.assign("s", "EMAIL_ADDRESS", "other@corp.example")
            assert (a, b) == ("<EMAIL_ADDRESS_1>", "<EMAIL_ADDRESS_2>")
            assert await vault.assign("s", "EMAIL_ADDRESS", "secret.person@corp.example") == a
            assert await vault.assign("t", "EMAIL_ADDRESS", "other@corp.example") == a
            assert (await vault.mapping("s"))[b] == "other@corp.example"
            await vault.close()

    asyncio.run(go())
    client = redis_server.client()
    keys = client.keys("*")
    assert keys and all(k.startswith(b"vg:") for k in keys)
    dump = b"".join(k + b"".join(client.hgetall(k).keys()) + b"".join(client.hgetall(k).values())
                    for k in keys)
    for raw in (b"secret.person", b"other@corp", b"corp.example"):
        assert raw not in dump


# --- real vLLM server ----------------------------------------------------------------------


@pytest.fixture
def server(isolation_redis):
    return isolation_redis


SECRET = ("Contact Jane at jane.roe@example.com, card 4111 1111 1111 1111, "
          "身份证11010519491231002X, 凤凰计划.")
RAW = ["jane.roe@example.com", "4111 1111 1111 1111", "11010519491231002X", "凤凰计划"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_model)


def test_engine_sees_only_placeholders_and_client_gets_values(server, tokenizer):
    status, body = echo(server, SECRET)
    assert status == 200, body
    assert body["choices"][0]["text"].startswith(SECRET)  # restored echo
    seen = engine_prompt(tokenizer, echo(server, SECRET, ids=True)[1])
    assert all(v not in seen for v in RAW), seen
    assert "<EMAIL_ADDRESS_1>" in seen and "<CN_RESIDENT_ID_1>" in seen
    log = server.log_text()
    assert all(v not in log for v in RAW)
    status, raw = echo(server, SECRET, stream=True)
    assert status == 200 and sse_text(raw).startswith(SECRET)


def test_multi_turn_reuses_placeholders_in_a_server_issued_session(server, tokenizer):
    _, first, token = echo(server, "mail jane.roe@example.com please", ids=True,
                           with_session=True)
    assert "<EMAIL_ADDRESS_1>" in engine_prompt(tokenizer, first) and token
    turn2 = "again: bob@x.example and jane.roe@example.com"
    seen = engine_prompt(tokenizer, echo(server, turn2, session=token, ids=True)[1])
    assert "again: <EMAIL_ADDRESS_2> and <EMAIL_ADDRESS_1>" in seen
    assert echo(server, turn2, session=token)[1]["choices"][0]["text"].startswith(turn2)
    # another session id of the same principal is another session: numbering starts again
    # (an anonymous caller's forged ids: tests/server/test_masking_strategies.py)
    seen = engine_prompt(tokenizer, echo(server, turn2, session="conv-1", ids=True)[1])
    assert "again: <EMAIL_ADDRESS_1> and <EMAIL_ADDRESS_2>" in seen


def test_every_post_route_but_the_masked_ones_is_refused(server):
    req = urllib.request.Request(server.url + "/openapi.json", headers=ALICE)
    with urllib.request.urlopen(req, timeout=30) as r:
        paths = json.loads(r.read())["paths"]
    posts = [p for p, ops in paths.items() if "post" in ops]
    assert len(posts) > 10
    body = {"model": "test", "prompt": SECRET, "input": SECRET, "text": SECRET,
            "messages": [{"role": "user", "content": SECRET}]}
    refused = 0
    for path in posts:
        if path in ROUTES or path in BODYLESS_POSTS or "{" in path:
            continue
        status, resp = post(server.url + path, body, ALICE)
        assert status == 403 and resp["error"]["code"] == "endpoint_not_allowed", path
        refused += 1
    assert refused >= 10
    log = server.log_text()
    assert all(v not in log for v in RAW) and "details: prompt:" in log


def test_200_concurrent_sessions_never_cross(server):
    def one(i: int) -> tuple[int, str]:
        status, body = echo(server, f"user{i} mail u{i}.x@example.com", session=f"sess-{i}")
        assert status == 200, body
        return i, body["choices"][0]["text"]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(200)))
    for i, text in results:
        assert f"u{i}.x@example.com" in text
        others = [j for j in (i - 1, i + 1) if 0 <= j < 200]
        assert all(f"u{j}.x@example.com" not in text for j in others)
        assert "<EMAIL_ADDRESS" not in text


def test_bad_requests_get_4xx(server):
    url = server.url + "/v1/completions"
    for body, code in [([1, 2], 400), ({"model": "test", "prompt": {"a": 1}}, 400),
                       ({"model": "test", "messages": "hi"}, 400)]:
        status, resp = post(url, body, ALICE)
        assert status == code and "error" in resp, (body, resp)
    req = urllib.request.Request(url, b"{oops", {"Content-Type": "application/json", **ALICE})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    big = {"model": "test", "prompt": "a" * (9 << 20)}
    assert oversized_post_status(server, url, big, ALICE) == 413


ACCESS_413 = '" 413 '  # uvicorn's access-log line for a 413


def oversized_post_status(server, url: str, body: dict, headers: dict[str, str]) -> int:
    """The status of a POST over the body limit. The server answers 413 once the limit is
    passed, before the rest arrives, and closes: the client can be reset while still
    sending, and then the server's access log is where the answer shows."""
    before = server.log_text().count(ACCESS_413)
    try:
        return post(url, body, headers)[0]
    except (ConnectionError, urllib.error.URLError) as e:
        if isinstance(e, urllib.error.URLError) and not isinstance(e.reason, ConnectionError):
            raise
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.log_text().count(ACCESS_413) > before:
            return 413
        time.sleep(0.1)
    return -1  # reset without a 413


def test_redis_down_fails_closed(server, redis_server):
    redis_server.stop()
    try:
        status, body = echo(server, "secret mail never.forwarded@example.com")
        assert status == 503 and body["error"]["code"] == "vault_unavailable"
        assert "never.forwarded" not in server.log_text()
    finally:
        redis_server.start()
