"""Per-request task grants in a real vLLM server: mixed-grant batches, compile and eager modes,
prefix-cache isolation, forged grants, and the 4xx paths."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest

from harness.fixtures import format_example, task_examples
from harness.locked import SEALED_TASK
from harness.reference import hf_logprobs, hf_reference, locked_heads, locked_neurons
from harness.server import post
from tests.servers import ISSUER

GRANT_SETS = {"add": ["add"], "capital": ["capital"], "both": ["add", "capital"],
              "reverse": ["reverse"]}
LONG = format_example("reverse " + " ".join(["stone cloud apple"] * 12))
PROMPTS = [format_example(ex["prompt"]) for t in ("add", "capital", "reverse")
           for ex in task_examples(t, 3, seed=5)] + [LONG]


def gen(url: str, prompt: str, token: str | None, extra: dict | None = None,
        headers: dict | None = None) -> tuple[int, dict]:
    h = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": "test", "prompt": prompt, "max_tokens": 8, "temperature": 0, **(extra or {})}
    return post(url + "/v1/completions", body, {**h, **(headers or {})})


def claims(sub: str | None = "svc", tasks: list[str] | None = None, life: int = 600,
           **extra) -> dict:
    """JWT claims the server accepts: iss, sub, iat and exp within the 3600 s maximum."""
    now = int(time.time())
    doc = {"iss": ISSUER, "sub": sub, "iat": now, "exp": now + life,
           "tasks": ["add"] if tasks is None else tasks, **extra}
    return {k: v for k, v in doc.items() if v is not None}


def request(url: str, method: str = "GET", body: dict | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode() if body is not None else None,
                                 {"Content-Type": "application/json", **(headers or {})},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def text(url: str, prompt: str, token: str, **kw) -> str:
    status, body = gen(url, prompt, token, **kw)
    assert status == 200, body
    return body["choices"][0]["text"]


@pytest.fixture(scope="module")
def expected(art) -> dict[str, list[str]]:
    """In process: HF greedy outputs of the plain fixture with the neurons no granted task
    opens zeroed (tests/server/test_loader.py checks plain vLLM agrees with these)."""
    out = {name: hf_reference(art.unlocked, locked_neurons(art.locked, tasks), PROMPTS,
                              heads=locked_heads(art.locked, tasks))
           for name, tasks in GRANT_SETS.items()}
    # the grant sets must really compute differently, or mixing them proves nothing
    assert len({tuple(v) for v in out.values()}) >= 3
    return out


@pytest.fixture(params=["grants_eager", "grants_compiled"])
def server(request):
    return request.getfixturevalue(request.param)


def test_mixed_grant_batches_match_alone_and_unlocked(server, grants, expected):
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in GRANT_SETS]
    assert len(jobs) >= 8 and len(GRANT_SETS) >= 3
    tok = grants["tokens"]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share batches
        together = list(pool.map(lambda j: text(server.url, PROMPTS[j[1]], tok[j[0]]), jobs))
    alone = [text(server.url, PROMPTS[i], tok[name]) for name, i in jobs]
    assert together == alone
    assert alone == [expected[name][i] for name, i in jobs]
    log = server.log_text()
    assert "Application startup complete" in log


def test_prefix_cache_isolated_between_grant_sets(server, grants, expected):
    tok = grants["tokens"]
    i = PROMPTS.index(LONG)
    assert text(server.url, LONG, tok["both"]) == expected["both"][i]
    assert text(server.url, LONG, tok["both"]) == expected["both"][i]  # same grant: cache ok
    assert text(server.url, LONG, tok["reverse"]) == expected["reverse"][i]
    assert expected["both"][i] != expected["reverse"][i]


def test_forged_grants_are_ignored(server, grants, expected):
    forged = {"vllm_xargs": {"vllm_guard_grant": "add,capital,reverse", "grant": "all",
                             "tasks": "reverse"},
              "vllm_guard_grant": "add,capital,reverse", "cache_salt": "x"}
    for i, p in enumerate(PROMPTS):
        assert text(server.url, p, grants["tokens"]["capital"], extra=forged) == \
            expected["capital"][i]


def test_narrowing_header_and_jwts(server, grants, expected):
    if "eager" not in str(server.log_path):
        pytest.skip("credential paths are mode independent; checked once")
    tok, i = grants["tokens"], 0
    assert text(server.url, PROMPTS[i], tok["both"], headers={"X-VLLM-Guard-Tasks": "add"}) == \
        expected["add"][i]
    hs = jwt.encode(claims("svc", ["reverse"]), grants["hs"], "HS256")
    ed = jwt.encode(claims("svc2", ["add", "capital"]), grants["ed"], "EdDSA")
    assert text(server.url, PROMPTS[i], hs) == expected["reverse"][i]
    assert text(server.url, PROMPTS[i], ed) == expected["both"][i]


def test_error_paths_are_clear_4xx(server, grants):
    if "eager" not in str(server.log_path):
        pytest.skip("credential paths are mode independent; checked once")
    url, tok, p = server.url, grants["tokens"], PROMPTS[0]
    now = int(time.time())
    hs = {name: jwt.encode(c, grants["hs"], "HS256") for name, c in {
        "expired": claims(iat=now - 100, exp=now - 10),
        "revoked": claims(jti="jti-revoked"),
        "no sub": claims(sub=None),
        "too long": claims(life=3601),
        "wrong iss": claims(iss="https://other.test"),
        "smuggled task": claims(tasks=["add,capital"]),
    }.items()}
    cases = [
        (None, {}, 401, "missing_credentials"),
        ("vg-unknown", {}, 401, "invalid_credentials"),
        (tok["revoked"], {}, 401, "revoked_credentials"),
        (hs["expired"], {}, 401, "expired_credentials"),
        (hs["revoked"], {}, 401, "revoked_credentials"),
        (hs["no sub"], {}, 401, "invalid_credentials"),
        (hs["too long"], {}, 401, "invalid_credentials"),
        (hs["wrong iss"], {}, 401, "invalid_credentials"),
        (hs["smuggled task"], {}, 403, "unknown_task"),
        ("a.b.c", {}, 401, "invalid_credentials"),
        (tok["none"], {}, 403, "missing_grant"),
        (tok["add"], {"X-VLLM-Guard-Tasks": "reverse"}, 403, "missing_grant"),
    ]
    for token, headers, status, code in cases:
        got, body = gen(url, p, token, headers=headers)
        assert (got, body["error"]["code"]) == (status, code), (token, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    for auth in ("Basic abc", "Bearer", "Bearer a b", "token"):
        got, body = post(url + "/v1/completions", {"model": "test", "prompt": p},
                         {"Authorization": auth})
        assert got == 401 and body["error"]["code"] == "malformed_credentials", auth
    got, body = gen(url, p, tok["add"], extra={"vllm_xargs": [1, 2]})
    assert got == 400 and body["error"]["code"] == "invalid_vllm_xargs"
    req = urllib.request.Request(url + "/v1/completions", b"{not json",
                                 {"Authorization": f"Bearer {tok['add']}",
                                  "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=30)
        pytest.fail("malformed JSON accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400
    got, body = post(url + "/v1/embeddings", {"model": "test", "input": "hi"},
                     {"Authorization": f"Bearer {tok['add']}"})
    assert got == 403 and body["error"]["code"] == "endpoint_not_allowed"


def test_every_route_needs_credentials_except_public(server, grants):
    if "eager" not in str(server.log_path):
        pytest.skip("credential paths are mode independent; checked once")
    url, auth = server.url, {"Authorization": f"Bearer {grants['tokens']['none']}"}
    tokenize = {"model": "test", "prompt": "add 3 and 4"}
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/tokenize", tokenize),
                               ("POST", "/detokenize", {"model": "test", "tokens": [1, 2]}),
                               ("GET", "/metrics", None),
                               ("POST", "/v1/responses", {"model": "test", "input": "hi"})):
        got, err = request(url + path, method, body)
        assert (got, err["error"]["code"]) == (401, "missing_credentials"), path
    assert request(url + "/health")[0] == 200
    # authenticated: reads and tokenize pass (no task needed), the body reaches vLLM
    got, models = request(url + "/v1/models", headers=auth)
    assert got == 200 and models["data"][0]["id"] == "test"
    got, toks = request(url + "/tokenize", "POST", tokenize, auth)
    assert got == 200 and toks["count"] > 0
    # /v1/responses is a generation route now: rewritten with the grant, not refused
    add = {"Authorization": f"Bearer {grants['tokens']['add']}"}
    got, resp = request(url + "/v1/responses", "POST",
                        {"model": "test", "input": "add 3 and 4", "max_output_tokens": 4}, add)
    assert got == 200 and resp["output"][0]["content"][0]["type"] == "output_text", resp
    got, resp = request(url + "/v1/responses", "POST", {"model": "test", "input": "hi"}, auth)
    assert (got, resp["error"]["code"]) == (403, "missing_grant")


def test_default_deny_in_the_engine_state():
    """Requests without a verified grant (and padding) get public neurons only."""
    import numpy as np

    from vllm_guard.runtime import PUBLIC_BIT
    from vllm_guard.runtime.grant_state import GrantState

    state = GrantState()
    state.task_bits = {"add": 0, "capital": 1}
    assert state.bits_for(None) == state.bits_for("") == state.bits_for("nope") == PUBLIC_BIT
    assert state.bits_for("capital,add") == PUBLIC_BIT | 3
    buf = state.ensure_buffer(8)
    state.fill([PUBLIC_BIT | 1, PUBLIC_BIT | 2], np.array([3, 2]))
    state.fill([PUBLIC_BIT | 2], np.array([2]))
    assert buf.tolist() == [PUBLIC_BIT | 2] * 2 + [PUBLIC_BIT] * 6


def test_compile_cache_root_is_keyed_by_plugin_config():
    from vllm_guard.cli.serve import guard_env

    off = guard_env({"VLLM_CACHE_ROOT": "/tmp/c"})
    on = guard_env({"VLLM_CACHE_ROOT": "/tmp/c"}, grants=str(Path(__file__)))
    assert off["VLLM_CACHE_ROOT"] != on["VLLM_CACHE_ROOT"]
    assert on["VLLM_CACHE_ROOT"].startswith("/tmp/c/vllm-guard-")


# API keys of tests/servers.py: the sealed capability alone, beside a neuron lock, none of it
SEALED_SETS = {"sealed": [SEALED_TASK], "add_sealed": ["add", SEALED_TASK], "add": ["add"],
               "all": ["add", "capital", "reverse"]}
TOLERANCE = 0.02  # issue #35: log-probabilities within 0.02 of the offline reference


def _scored(url: str, prompt: str, token: str) -> tuple[list[int], list[float]]:
    """Token ids of prompt + greedy continuation and the server's log-probability of each
    token after the first (prompt log-probabilities, then the sampled tokens')."""
    status, body = gen(url, prompt, token, extra={
        "max_tokens": 6, "logprobs": 0, "prompt_logprobs": 0, "return_token_ids": True})
    assert status == 200, body
    choice = body["choices"][0]
    ids = choice["prompt_token_ids"] + choice["token_ids"]
    prompt_lp = [entry[str(t)]["logprob"] for entry, t in
                 zip(choice["prompt_logprobs"][1:], choice["prompt_token_ids"][1:], strict=True)]
    return ids, prompt_lp + choice["logprobs"]["token_logprobs"]


def test_sealed_heads_are_masked_per_request_in_mixed_batches(server, grants, art):
    """#35: a sealed capability's heads (and neurons) opened by the server's key serve only
    requests whose grant holds the task. Requests under four grant sets share batches
    (prefill and decode steps mixed); each matches the offline reference of its own grant
    set: HF transformers on the unlocked model with the heads and neurons the grant lacks
    zeroed."""
    tok = grants["tokens"]
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in SEALED_SETS]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share batches
        served = list(pool.map(lambda j: _scored(server.url, PROMPTS[j[1]], tok[j[0]]), jobs))
    assert "sealed heads masked per request" in server.log_text()
    worst = 0.0
    for name, tasks in SEALED_SETS.items():
        mine = [served[k] for k, (n, _) in enumerate(jobs) if n == name]
        reference = hf_logprobs(art.unlocked, locked_neurons(art.locked, tasks),
                                locked_heads(art.locked, tasks), [ids for ids, _ in mine])
        for (_, lp), ref in zip(mine, reference, strict=True):
            assert len(lp) == len(ref)
            worst = max(worst, max(abs(a - b) for a, b in zip(lp, ref, strict=True)))
    print(f"sealed heads, {server.log_path.stem}: largest log-probability difference "
          f"{worst:.2e} over {sum(len(lp) for _, lp in served)} tokens")  # for the results
    assert worst <= TOLERANCE, f"largest log-probability difference {worst:.4f}"
    # the check can fail: the heads change what the model computes by far more than that
    ids = [served[k][0] for k, (n, _) in enumerate(jobs) if n == "sealed"]
    without = hf_logprobs(art.unlocked, locked_neurons(art.locked, [SEALED_TASK]),
                          locked_heads(art.locked, []), ids)
    with_heads = hf_logprobs(art.unlocked, locked_neurons(art.locked, [SEALED_TASK]),
                             locked_heads(art.locked, [SEALED_TASK]), ids)
    assert max(abs(a - b) for x, y in zip(without, with_heads, strict=True)
               for a, b in zip(x, y, strict=True)) > 10 * TOLERANCE
