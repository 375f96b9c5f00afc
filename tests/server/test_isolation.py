"""Tenant isolation against a real vLLM server with grants and masking (in-memory and Redis
vault): one principal never reads another's values, whatever session id it sends, and no
route or field carries a raw value to the engine (checked in vLLM's own DEBUG request log)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from harness.masking_client import sse_text
from harness.server import post
from tests.servers import token
from tests.unit.masking.test_fields import CARD, NUMBER_BODIES, TEXT_BODIES
from vllm_guard.masking.fields import ROUTES
from vllm_guard.masking.middleware import BODYLESS_POSTS

EMAIL, SSN = "alice.private@example.com", "078-05-1120"
SECRET = f"write to {EMAIL} about {SSN}"
TOKENS = {who: token(who) for who in ("alice", "bob")}


@pytest.fixture(params=["isolation_memory", "isolation_redis"])
def server(request):
    return request.getfixturevalue(request.param)


def call(server, who: str, body: dict, session: str | None = None,
         path: str = "/v1/completions") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"}
    if session:
        headers["x-vllm-guard-session"] = session
    return post(server.url + path, {"model": "test", **body}, headers)


def streamed(server, who: str, body: dict, session: str) -> str:
    req = urllib.request.Request(
        server.url + "/v1/completions", json.dumps({"model": "test", **body,
                                                    "stream": True}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {TOKENS[who]}",
         "x-vllm-guard-session": session})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


FORCE = {"max_tokens": 48, "temperature": 0,
         "structured_outputs": {"regex": "<EMAIL_ADDRESS_1> <US_SSN_1>"}}


def test_model_output_restores_only_the_callers_own_values(server):
    """Bob forces the engine to emit Alice's placeholders in Alice's session id."""
    status, body = call(server, "alice", {"prompt": SECRET, **FORCE}, "shared")
    assert status == 200, body
    assert body["choices"][0]["text"] == f"{EMAIL} {SSN}"  # the channel works for Alice
    assert EMAIL in streamed(server, "alice", {"prompt": SECRET, **FORCE}, "shared")
    status, body = call(server, "bob", {"prompt": "hello", **FORCE}, "shared")
    assert status == 200 and body["choices"][0]["text"] == "<EMAIL_ADDRESS_1> <US_SSN_1>"
    out = streamed(server, "bob", {"prompt": "hello", **FORCE}, "shared")
    assert EMAIL not in out and SSN not in out


@pytest.mark.parametrize("stream", [False, True])
def test_echo_of_typed_placeholders_restores_nothing(server, stream):
    assert call(server, "alice", {"prompt": SECRET, "max_tokens": 1}, "shared2")[0] == 200
    body = {"prompt": "<EMAIL_ADDRESS_1> <US_SSN_1>", "max_tokens": 1, "echo": True}
    for who in ("bob", "alice"):  # typed look-alikes are neutralised, even for the owner
        out = streamed(server, who, body, "shared2") if stream else json.dumps(
            call(server, who, body, "shared2")[1])
        assert EMAIL not in out and SSN not in out
        # ... and echoed exactly as typed (#32 item 4), never as their neutral form
        text = sse_text(out.encode()) if stream else json.loads(out)["choices"][0]["text"]
        assert text.startswith(body["prompt"]), (who, text)


def test_a_raw_value_reveals_nothing_about_another_session(server):
    assert call(server, "alice", {"prompt": SECRET, "max_tokens": 1}, "shared3")[0] == 200
    status, body = call(server, "bob", {"prompt": f"bob@x.org {EMAIL}", "max_tokens": 1,
                                        "echo": True, "logprobs": 1}, "shared3")
    assert status == 200, body
    tokens = "".join(body["choices"][0]["logprobs"]["tokens"])
    assert "<EMAIL_ADDRESS_1>" in tokens and "<EMAIL_ADDRESS_2>" in tokens
    assert tokens.index("<EMAIL_ADDRESS_1>") < tokens.index("<EMAIL_ADDRESS_2>")


@pytest.mark.parametrize("route,body", TEXT_BODIES)
def test_every_text_field_is_masked_or_refused_at_the_engine(server, route, body):
    body = json.loads(json.dumps(body).replace("jane.roe@example.com", EMAIL))
    if route != "/v1/responses":
        body["max_tokens"] = 2
    status, resp = call(server, "alice", body, path=route)
    assert status == 200 or 400 <= status < 500, resp
    assert EMAIL not in server.log_text()


@pytest.mark.parametrize("route,body,path", NUMBER_BODIES)
def test_a_card_number_sent_as_a_json_number_never_reaches_the_engine(server, route, body,
                                                                      path):
    """The masker scanned strings only: a card number as a JSON number (a schema default,
    an enum, tool-call arguments, a seed) reached the engine raw. Now refused by the guard
    (not by vLLM: the error code is the masker's), naming the field."""
    status, resp = call(server, "alice", body, path=route)
    assert status == 400, resp
    assert resp["error"]["code"] == "sensitive_value_in_control_field", resp
    assert f"'{path}'" in resp["error"]["message"]
    assert str(CARD) not in json.dumps(resp) and str(CARD) not in server.log_text()


def test_every_other_post_route_is_refused(server):
    req = urllib.request.Request(server.url + "/openapi.json",
                                 headers={"Authorization": f"Bearer {TOKENS['alice']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        spec = json.loads(r.read())
    posts = [p for p, ops in spec["paths"].items() if "post" in ops]
    assert len(posts) > 10 and all(r in posts for r in ROUTES)
    for path in posts:
        if path in ROUTES or path in BODYLESS_POSTS or "{" in path:
            continue
        status, resp = call(server, "alice", {"prompt": SECRET, "input": SECRET,
                                              "messages": [{"role": "user",
                                                            "content": SECRET}]}, path=path)
        assert 400 <= status < 500, (path, status, resp)
    assert EMAIL not in server.log_text() and SSN not in server.log_text()
    assert "details: prompt:" in server.log_text()  # vLLM's DEBUG request log is on
