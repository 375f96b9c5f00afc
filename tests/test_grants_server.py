"""Per-request task grants in a real vLLM server: mixed-grant batches, compile and eager modes,
prefix-cache isolation, forged grants, and the 4xx paths."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import LOG_DIR
from vllm_guard.grants.credentials import hash_api_key
from vllm_guard.secneuron.keys import load_task_keys
from vllm_guard.secneuron.lock import unlock_checkpoint
from vllm_guard.testing.demo import locked_fixture
from vllm_guard.testing.fixtures import format_example, task_examples
from vllm_guard.testing.server import VllmServer, post

pytestmark = pytest.mark.server

GRANT_SETS = {"add": ["add"], "capital": ["capital"], "both": ["add", "capital"],
              "reverse": ["reverse"]}
LONG = format_example("reverse " + " ".join(["stone cloud apple"] * 12))
PROMPTS = [format_example(ex["prompt"]) for t in ("add", "capital", "reverse")
           for ex in task_examples(t, 3, seed=5)] + [LONG]
PLAIN_ENV = {"VLLM_PLUGINS": "__no_plugin__"}


@pytest.fixture(scope="module")
def art():
    return locked_fixture()


@pytest.fixture(scope="module")
def grants(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("grants")
    tokens = {name: f"vg-test-{name}-key" for name in [*GRANT_SETS, "none", "revoked"]}
    (d / "hs.secret").write_text("test-hs256-secret-of-sufficient-length!")
    priv = Ed25519PrivateKey.generate()
    (d / "ed.pub").write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    doc = {"mode": "required", "tasks": ["add", "capital", "reverse"],
           "api_keys": [{"name": n, "sha256": hash_api_key(tok),
                         "tasks": GRANT_SETS.get(n, ["add"] if n == "revoked" else [])}
                        for n, tok in tokens.items()],
           "jwt": {"hs256_secret_file": "hs.secret", "eddsa_public_key": "ed.pub"},
           "revoked": ["revoked", "jti-revoked"]}
    (d / "grants.json").write_text(json.dumps(doc))
    return {"file": str(d / "grants.json"), "tokens": tokens, "ed": priv,
            "hs": (d / "hs.secret").read_text()}


def gen(url: str, prompt: str, token: str | None, extra: dict | None = None,
        headers: dict | None = None) -> tuple[int, dict]:
    h = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": "test", "prompt": prompt, "max_tokens": 8, "temperature": 0, **(extra or {})}
    return post(url + "/v1/completions", body, {**h, **(headers or {})})


def text(url: str, prompt: str, token: str, **kw) -> str:
    status, body = gen(url, prompt, token, **kw)
    assert status == 200, body
    return body["choices"][0]["text"]


@pytest.fixture(scope="module")
def expected(art, tmp_path_factory) -> dict[str, list[str]]:
    """Plain vLLM (no plugin) serving the unlocked checkpoint of each grant set."""
    out = {}
    root = tmp_path_factory.mktemp("unlocked")
    for name, tasks in GRANT_SETS.items():
        unlock_checkpoint(art.locked, load_task_keys([art.key(t) for t in tasks]), root / name)
        srv = VllmServer(str(root / name), ["--enforce-eager"],
                         LOG_DIR / f"grants_plain_{name}.log", PLAIN_ENV, guard=False)
        with srv:
            out[name] = [post(srv.url + "/v1/completions", {
                "model": "test", "prompt": p, "max_tokens": 8, "temperature": 0})[1]
                ["choices"][0]["text"] for p in PROMPTS]
    # the grant sets must really compute differently, or mixing them proves nothing
    assert len({tuple(v) for v in out.values()}) >= 3
    return out


@pytest.fixture(scope="module", params=["eager", "compiled"])
def server(request, art, grants):
    args = ["--load-format", "secneuron",
            "--model-loader-extra-config", json.dumps(art.loader_config())]
    if request.param == "eager":
        args.append("--enforce-eager")
    srv = VllmServer(str(art.locked), args, LOG_DIR / f"grants_{request.param}.log",
                     grants=grants["file"])
    srv.start()
    try:
        yield srv.wait_ready(900)
    finally:
        srv.stop()


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
    exp = int(time.time()) + 600
    hs = jwt.encode({"sub": "svc", "tasks": ["reverse"], "exp": exp}, grants["hs"], "HS256")
    ed = jwt.encode({"sub": "svc2", "tasks": ["add", "capital"], "exp": exp}, grants["ed"],
                    "EdDSA")
    assert text(server.url, PROMPTS[i], hs) == expected["reverse"][i]
    assert text(server.url, PROMPTS[i], ed) == expected["both"][i]


def test_error_paths_are_clear_4xx(server, grants):
    if "eager" not in str(server.log_path):
        pytest.skip("credential paths are mode independent; checked once")
    url, tok, p = server.url, grants["tokens"], PROMPTS[0]
    expired = jwt.encode({"tasks": ["add"], "exp": int(time.time()) - 10}, grants["hs"], "HS256")
    revoked_jwt = jwt.encode({"tasks": ["add"], "jti": "jti-revoked",
                              "exp": int(time.time()) + 60}, grants["hs"], "HS256")
    cases = [
        (None, {}, 401, "missing_credentials"),
        ("vg-unknown", {}, 401, "invalid_credentials"),
        (tok["revoked"], {}, 401, "revoked_credentials"),
        (expired, {}, 401, "expired_credentials"),
        (revoked_jwt, {}, 401, "revoked_credentials"),
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
    import urllib.request

    req = urllib.request.Request(url + "/v1/completions", b"{not json",
                                 {"Authorization": f"Bearer {tok['add']}",
                                  "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=30)
        pytest.fail("malformed JSON accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400
    got, body = post(url + "/v1/responses", {"model": "test", "input": "hi"},
                     {"Authorization": f"Bearer {tok['add']}"})
    assert got == 403 and body["error"]["code"] == "endpoint_not_allowed"


def test_default_deny_in_the_engine_state():
    """Requests without a verified grant (and padding) get public neurons only."""
    import numpy as np

    from vllm_guard.grants.engine import GrantState
    from vllm_guard.kernels.masked_silu import PUBLIC_BIT

    state = GrantState()
    state.task_bits = {"add": 0, "capital": 1}
    assert state.bits_for(None) == state.bits_for("") == state.bits_for("nope") == PUBLIC_BIT
    assert state.bits_for("capital,add") == PUBLIC_BIT | 3
    buf = state.ensure_buffer(8)
    state.fill([PUBLIC_BIT | 1, PUBLIC_BIT | 2], np.array([3, 2]))
    state.fill([PUBLIC_BIT | 2], np.array([2]))
    assert buf.tolist() == [PUBLIC_BIT | 2] * 2 + [PUBLIC_BIT] * 6


def test_compile_cache_root_is_keyed_by_plugin_config():
    from vllm_guard.cli import guard_env

    off = guard_env({"VLLM_CACHE_ROOT": "/tmp/c"})
    on = guard_env({"VLLM_CACHE_ROOT": "/tmp/c"}, grants=str(Path(__file__)))
    assert off["VLLM_CACHE_ROOT"] != on["VLLM_CACHE_ROOT"]
    assert on["VLLM_CACHE_ROOT"].startswith("/tmp/c/vllm-guard-")
