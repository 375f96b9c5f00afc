"""GrantMiddleware and the grants file, in process (no vLLM): the middleware is driven as an
ASGI app in front of a recording fake app, with fake receive/send."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest

from vllm_guard import configs
from vllm_guard.asgi import PRINCIPAL_KEY
from vllm_guard.errors import GuardError
from vllm_guard.grants.credentials import Authenticator, GrantsConfig, hash_api_key
from vllm_guard.grants.middleware import GrantMiddleware

HS = "unit-test-hs256-secret-32-bytes-long!!"
KEYS = {"alice": ["add"], "bob": ["add"], "carol": ["capital"], "none": [], "gone": ["add"]}


def token(name: str) -> str:
    return f"vg-unit-{name}"


def write_grants(d: Path, **over: object) -> Path:
    (d / "hs.secret").write_text(HS)
    doc = {"mode": "required", "tasks": ["add", "capital", "reverse"],
           "api_keys": [{"name": n, "sha256": hash_api_key(token(n)), "tasks": t}
                        for n, t in KEYS.items()],
           "jwt": {"hs256_secret_file": "hs.secret", "issuer": "https://idp.example"},
           "revoked": ["gone"], **over}
    doc = {k: v for k, v in doc.items() if v is not None}
    path = d / "grants.json"
    path.write_text(json.dumps(doc))
    return path


def make_jwt(secret: str = HS, **claims: object) -> str:
    now = int(time.time())
    base = {"iss": "https://idp.example", "sub": "svc", "iat": now, "exp": now + 600,
            "tasks": ["reverse"]}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, secret, "HS256")


@dataclass
class Result:
    status: int | None  # HTTP status, or None for a websocket
    body: dict
    sent: list[dict]
    reads: int  # how often the middleware called receive()
    downstream: list[tuple[dict, bytes]] = field(default_factory=list)

    @property
    def scope(self) -> dict:
        assert len(self.downstream) == 1, "request did not reach the app"
        return self.downstream[0][0]

    @property
    def forwarded(self) -> dict:
        assert len(self.downstream) == 1, "request did not reach the app"
        return json.loads(self.downstream[0][1])


class FakeApp:
    """Records what reaches it: the scope and the body it can read."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict, bytes]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            self.calls.append((dict(scope), b""))
            await send({"type": "websocket.accept"})
            return
        body = b""
        if scope.get("method") == "POST":
            body = (await receive()).get("body", b"")
        self.calls.append((dict(scope), body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def call(mw: GrantMiddleware, method: str, path: str, auth: str | None = None,
         body: dict | None = None, root_path: str = "", kind: str = "http",
         headers: dict[str, str] | None = None) -> Result:
    app: FakeApp = mw.app  # type: ignore[assignment]
    app.calls.clear()
    reads, sent = 0, []
    raw = json.dumps(body if body is not None else {"model": "m", "prompt": "p"}).encode()

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(msg: dict) -> None:
        sent.append(msg)

    hdrs = dict(headers or {})
    if auth is not None:
        hdrs["Authorization"] = auth
    scope = {"type": kind, "path": path, "root_path": root_path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()]}
    if kind == "http":
        scope["method"] = method
    asyncio.run(mw(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Result(status, json.loads(out) if out and status != 200 else {}, sent, reads,
                  list(app.calls))


def bearer(name: str) -> str:
    return f"Bearer {token(name)}"


@pytest.fixture
def grants_file(tmp_path) -> Path:
    return write_grants(tmp_path)


@pytest.fixture
def mw(grants_file) -> GrantMiddleware:
    return GrantMiddleware(FakeApp(), str(grants_file))


# --- 1. authenticate before the body is read ---------------------------------------------


@pytest.mark.parametrize("auth,code", [
    (None, "missing_credentials"), ("Bearer vg-nobody", "invalid_credentials"),
    ("Basic abc", "malformed_credentials"), (bearer("gone"), "revoked_credentials"),
    ("Bearer a.b.c", "invalid_credentials")])
def test_body_is_not_read_without_valid_credentials(mw, auth, code):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize"):
        r = call(mw, "POST", path, auth)
        assert (r.status, r.body["error"]["code"]) == (401, code), (path, r.body)
        assert r.reads == 0 and not r.downstream, path


def test_missing_grant_refused_before_the_body(mw):
    r = call(mw, "POST", "/v1/completions", bearer("none"))
    assert (r.status, r.body["error"]["code"], r.reads) == (403, "missing_grant", 0)
    r = call(mw, "POST", "/v1/completions", bearer("alice"),
             headers={"X-VLLM-Guard-Tasks": "capital"})
    assert (r.status, r.body["error"]["code"], r.reads) == (403, "missing_grant", 0)


# --- 2. every route needs a credential except public_paths -------------------------------


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics"),
    ("GET", "/v1/responses/resp_123"), ("HEAD", "/v1/models"), ("POST", "/v1/embeddings")])
def test_every_non_public_route_needs_credentials(mw, method, path):
    r = call(mw, method, path)
    assert (r.status, r.body["error"]["code"]) == (401, "missing_credentials")
    assert r.reads == 0 and not r.downstream


def test_unauthenticated_websocket_closed_before_accept(mw):
    for auth in (None, "Bearer vg-nobody"):
        r = call(mw, "", "/v1/realtime", auth, kind="websocket")
        assert r.sent == [{"type": "websocket.close", "code": 1008}] and not r.downstream


def test_authenticated_websocket_passes_with_principal(mw):
    r = call(mw, "", "/v1/realtime", bearer("alice"), kind="websocket")
    assert r.sent == [{"type": "websocket.accept"}]
    assert r.scope[PRINCIPAL_KEY] == "key:alice"


def test_public_paths_need_no_credentials(mw):
    for path in ("/health", "/ping", "/version", "/health/"):
        r = call(mw, "GET", path)
        assert r.status == 200 and PRINCIPAL_KEY not in r.scope, path
    assert call(mw, "POST", "/ping").status == 200  # SageMaker's POST health check


def test_authenticated_reads_and_tokenize_pass_other_posts_refused(mw):
    r = call(mw, "GET", "/v1/models", bearer("none"))  # no task needed to list models
    assert r.status == 200 and r.scope[PRINCIPAL_KEY] == "key:none"
    r = call(mw, "POST", "/tokenize", bearer("alice"), body={"prompt": "hi"})
    assert r.status == 200 and r.forwarded == {"prompt": "hi"}
    for path in ("/v1/embeddings", "/v1/responses/resp_1/cancel", "/pooling"):
        r = call(mw, "POST", path, bearer("alice"))
        assert (r.status, r.body["error"]["code"]) == (403, "endpoint_not_allowed"), path
        assert r.reads == 0
    r = call(mw, "DELETE", "/v1/models", bearer("alice"))
    assert (r.status, r.body["error"]["code"]) == (403, "endpoint_not_allowed")


def test_generation_routes_rewritten_including_responses(mw):
    forged = {"model": "m", "input": "x", "vllm_xargs": {"vllm_guard_grant": "add,capital",
                                                        "task": "capital", "top_k": 3},
              "vllm_guard_grant": "capital"}
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
        r = call(mw, "POST", path, bearer("alice"), body=forged)
        assert r.status == 200, r.body
        fwd = r.forwarded
        assert fwd["vllm_xargs"] == {"vllm_guard_grant": "add", "top_k": 3}
        assert "vllm_guard_grant" not in fwd and fwd["cache_salt"].startswith("vg")


@pytest.mark.parametrize("where", ["top", "vllm_xargs"])
@pytest.mark.parametrize("field", ["kv_transfer_params", "ec_transfer_params"])
def test_client_kv_transfer_params_refused(mw, field, where):
    """A KV connector would pull the blocks a client names: another request's KV."""
    params = {"remote_block_ids": [1], "remote_host": "127.0.0.1"}
    body = ({"prompt": "x", field: params} if where == "top"
            else {"prompt": "x", "vllm_xargs": {field: params}})
    r = call(mw, "POST", "/v1/completions", bearer("alice"), body=body)
    assert (r.status, r.body["error"]["code"]) == (400, "transfer_not_allowed")
    assert not r.downstream
    assert call(mw, "POST", "/v1/completions", bearer("alice"),
                body={"prompt": "x", field: None}).status == 200


@pytest.mark.parametrize("root", ["/api", "/api/"])
def test_root_path_variants(mw, root):
    r = call(mw, "POST", "/api/v1/completions", root_path="/api")
    assert (r.status, r.reads) == (401, 0)
    r = call(mw, "POST", "/api/v1/completions", bearer("alice"), root_path="/api")
    assert r.status == 200 and r.forwarded["vllm_xargs"]["vllm_guard_grant"] == "add"
    r = call(mw, "POST", "/api/v1/responses", bearer("alice"), root_path="/api")
    assert r.status == 200 and r.forwarded["vllm_xargs"]["vllm_guard_grant"] == "add"
    assert call(mw, "GET", "/api/v1/models", root_path="/api").status == 401
    assert call(mw, "POST", "/api/tokenize", root_path="/api").status == 401
    assert call(mw, "POST", "/api/tokenize", bearer("alice"), root_path="/api").status == 200
    assert call(mw, "GET", "/api/health", root_path="/api").status == 200
    # a path outside root_path is matched as is (what the router sees), never as public
    assert call(mw, "GET", "/apihealth", root_path="/api").status == 401


def test_public_paths_configurable_and_never_generation(tmp_path):
    path = write_grants(tmp_path, public_paths=["/health", "/metrics"])
    mw = GrantMiddleware(FakeApp(), str(path))
    assert call(mw, "GET", "/metrics").status == 200
    assert call(mw, "GET", "/ping").status == 401
    write_grants(tmp_path, public_paths=["/v1/completions"])
    with pytest.raises(GuardError, match="public_paths"):
        GrantsConfig.load(path)


# --- 3. principal ------------------------------------------------------------------------


def test_principal_is_set_per_credential(mw):
    assert call(mw, "POST", "/v1/completions", bearer("alice")).scope[PRINCIPAL_KEY] == \
        "key:alice"
    r = call(mw, "POST", "/v1/completions", f"Bearer {make_jwt(sub='u-1')}")
    assert r.scope[PRINCIPAL_KEY] == "jwt:https://idp.example|u-1"


def test_anonymous_gets_no_principal_in_optional_mode(tmp_path):
    mw = GrantMiddleware(FakeApp(), str(write_grants(tmp_path, mode="optional")))
    r = call(mw, "POST", "/v1/completions")
    assert r.status == 200 and PRINCIPAL_KEY not in r.scope
    assert r.forwarded["vllm_xargs"]["vllm_guard_grant"] == ""
    assert call(mw, "GET", "/v1/models").status == 200
    assert call(mw, "POST", "/v1/completions", "Bearer vg-nobody").status == 401


# --- 4. prefix-cache isolation -----------------------------------------------------------


def salt(mw: GrantMiddleware, auth: str | None, client: str | None = None) -> str:
    body = {"model": "m", "prompt": "p", **({"cache_salt": client} if client else {})}
    r = call(mw, "POST", "/v1/completions", auth, body=body)
    assert r.status == 200, r.body
    return r.forwarded["cache_salt"]


def test_cache_salt_per_principal_by_default(mw):
    alice, bob, carol = (salt(mw, bearer(n)) for n in ("alice", "bob", "carol"))
    assert alice != bob  # same grant set, different users: no shared prefix cache
    assert alice == salt(mw, bearer("alice")) and alice != carol
    assert salt(mw, bearer("alice"), "mine") != alice


def test_cache_salt_per_grant_set_when_opted_in(tmp_path):
    mw = GrantMiddleware(FakeApp(), str(write_grants(tmp_path, cache_isolation="grant_set")))
    assert salt(mw, bearer("alice")) == salt(mw, bearer("bob")) != salt(mw, bearer("carol"))
    write_grants(tmp_path, cache_isolation="everyone")
    with pytest.raises(GuardError, match="cache_isolation"):
        GrantsConfig.load(tmp_path / "grants.json")


def test_anonymous_callers_share_no_prefix_cache(tmp_path):
    mw = GrantMiddleware(FakeApp(), str(write_grants(tmp_path, mode="optional")))
    assert salt(mw, None) != salt(mw, None)  # nobody to tie them to: no reuse at all
    assert salt(mw, None, "my-secret") == salt(mw, None, "my-secret")


# --- 5. JWT policy -----------------------------------------------------------------------


def jwt_status(mw: GrantMiddleware, tok: str) -> tuple[int | None, str | None]:
    r = call(mw, "POST", "/v1/completions", f"Bearer {tok}")
    return r.status, (r.body.get("error") or {}).get("code")


def test_short_hs256_secret_refused_at_load(tmp_path):
    path = write_grants(tmp_path)
    (tmp_path / "hs.secret").write_text("0123456789abcdef")  # 16 bytes
    with pytest.raises(GuardError, match="hs256_secret_file") as e:
        GrantsConfig.load(path)
    assert "32" in str(e.value) and "\n" not in str(e.value)


def test_jwt_claims_policy(mw):
    now = int(time.time())
    assert jwt_status(mw, make_jwt()) == (200, None)
    assert jwt_status(mw, make_jwt(iat=now + 20)) == (200, None)  # small clock skew is fine
    refused = {
        "wrong iss": make_jwt(iss="https://evil.example"),
        "no iss": make_jwt(iss=None),
        "no sub": make_jwt(sub=None),
        "empty sub": make_jwt(sub=""),
        "no iat": make_jwt(iat=None),
        "NaN iat": make_jwt(iat=float("nan")),
        "string iat": make_jwt(iat=str(now)),
        "no exp": make_jwt(exp=None),
        "too long": make_jwt(iat=now, exp=now + 3601),
        "iat in future": make_jwt(iat=now + 120, exp=now + 600),
        "wrong secret": make_jwt(secret="another-secret-that-is-long-enough!!"),
        "alg none": jwt.encode({"sub": "x", "iat": now, "exp": now + 60}, None, "none"),
    }
    for why, tok in refused.items():
        assert jwt_status(mw, tok) == (401, "invalid_credentials"), why
    assert jwt_status(mw, make_jwt(exp=now - 5, iat=now - 60)) == (401, "expired_credentials")


def test_jwt_tasks_must_be_listed(mw):
    for tasks in (["add,capital"], ["delete"], ["add", ""], ["ADD"]):
        assert jwt_status(mw, make_jwt(tasks=tasks)) == (403, "unknown_task"), tasks
    assert jwt_status(mw, make_jwt(tasks="add")) == (401, "invalid_credentials")
    r = call(mw, "POST", "/v1/completions", f"Bearer {make_jwt(tasks=['add', 'capital'])}")
    assert r.forwarded["vllm_xargs"]["vllm_guard_grant"] == "add,capital"


def test_jwt_revocation_by_jti_and_sub(tmp_path):
    mw = GrantMiddleware(FakeApp(), str(write_grants(tmp_path, revoked=["j-1", "bad-sub"])))
    assert jwt_status(mw, make_jwt(jti="j-1")) == (401, "revoked_credentials")
    assert jwt_status(mw, make_jwt(sub="bad-sub")) == (401, "revoked_credentials")
    assert jwt_status(mw, make_jwt(jti="j-2")) == (200, None)


def test_max_lifetime_configurable(tmp_path):
    path = write_grants(tmp_path, jwt={"hs256_secret_file": "hs.secret",
                                       "max_lifetime_seconds": 60})
    mw = GrantMiddleware(FakeApp(), str(path))
    now = int(time.time())
    assert jwt_status(mw, make_jwt(iss=None, exp=now + 60)) == (200, None)
    assert jwt_status(mw, make_jwt(iss=None, exp=now + 61)) == (401, "invalid_credentials")


# --- 6. strict grants file ---------------------------------------------------------------


@pytest.mark.parametrize("over,key", [
    ({"revoke": ["alice"]}, "'revoke'"),
    ({"mode": 1}, "'mode'"),
    ({"mode": "maybe"}, "'mode'"),
    ({"tasks": "add"}, "'tasks'"),
    ({"api_keys": {}}, "'api_keys'"),
    ({"revoked": "alice"}, "'revoked'"),
    ({"tasks": None}, "'tasks'"),  # JWTs configured: tasks is required
    ({"tasks": ["add", "add,capital"]}, "'tasks'"),
    ({"api_keys": [{"name": "x", "sha256": "0" * 64, "tasks": ["a b"]}]}, "'tasks'"),
    ({"api_keys": [{"name": "x", "sha256": "0" * 64, "tasks": [], "task": ["add"]}]}, "'task'"),
    ({"api_keys": [{"name": "x", "sha256": "abc", "tasks": []}]}, "'sha256'"),
    ({"api_keys": [{"name": "x", "sha256": "0" * 64, "tasks": []},
                   {"name": "x", "sha256": "1" * 64, "tasks": []}]}, "'name'"),
    ({"jwt": {"hs256_secret_file": "hs.secret", "isuer": "x"}}, "'isuer'"),
    ({"jwt": {"hs256_secret_file": "hs.secret", "max_lifetime_seconds": "60"}},
     "'max_lifetime_seconds'"),
    ({"jwt": {"hs256_secret_file": "missing.secret"}}, "'hs256_secret_file'"),
    ({"jwt": {}}, "'hs256_secret_file'"),
    ({"public_paths": ["health"]}, "'public_paths'"),
    ({"cache_isolation": True}, "'cache_isolation'"),
])
def test_grants_file_refused_with_one_line_naming_the_key(tmp_path, over, key):
    path = write_grants(tmp_path, **over)  # a None value drops the key
    with pytest.raises(GuardError) as e:
        GrantsConfig.load(path)
    msg = str(e.value)
    assert key in msg and str(path) in msg and "\n" not in msg, msg


def test_duplicate_json_keys_refused(tmp_path):
    path = write_grants(tmp_path)
    text = path.read_text()
    path.write_text(text[:-1] + ', "revoked": []}')  # a second "revoked" would win silently
    with pytest.raises(GuardError, match="'revoked'"):
        GrantsConfig.load(path)


def test_task_names_validated_without_jwt(tmp_path):
    path = write_grants(tmp_path, jwt=None, tasks=None, api_keys=[
        {"name": "x", "sha256": "0" * 64, "tasks": ["add\n"]}])
    with pytest.raises(GuardError, match="'tasks'"):
        GrantsConfig.load(path)
    write_grants(tmp_path, jwt=None, tasks=None)  # tasks optional without JWTs
    assert GrantsConfig.load(path).known_tasks is None


def test_example_grants_file_loads():
    example = configs.path("grants.example.json")
    cfg = GrantsConfig.load(example)
    assert cfg.mode == "required" and cfg.cache_isolation == "principal"


# --- 7. reload ---------------------------------------------------------------------------


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def bump(path: Path, text: str) -> None:
    """Rewrite with a new mtime even on coarse-mtime file systems."""
    st = path.stat()
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_reload_applies_revocation_and_keeps_last_good_config(grants_file, mw):
    logger = logging.getLogger("vllm.vllm_guard.grants.credentials")
    lines = Lines()
    logger.addHandler(lines)
    try:
        assert call(mw, "POST", "/v1/completions", bearer("alice")).status == 200
        doc = json.loads(grants_file.read_text())
        doc["revoked"].append("alice")
        bump(grants_file, json.dumps(doc))
        r = call(mw, "POST", "/v1/completions", bearer("alice"))
        assert (r.status, r.body["error"]["code"]) == (401, "revoked_credentials")
        for broken in ('{"mode": "required", "revoke": []', json.dumps({**doc, "mode": 1})):
            bump(grants_file, broken)
            for _ in range(3):  # keeps serving with the last good config, never falls open
                assert call(mw, "POST", "/v1/completions", bearer("alice")).status == 401
                assert call(mw, "POST", "/v1/completions", bearer("bob")).status == 200
                assert call(mw, "GET", "/v1/models").status == 401
        errors = [ln for ln in lines.lines if ln.startswith("ERROR")]
        assert len(errors) == 2 and all(str(grants_file) in ln and "\n" not in ln
                                        for ln in errors), errors
        grants_file.unlink()  # a missing file too keeps the last good config
        assert call(mw, "POST", "/v1/completions", bearer("alice")).status == 401
        assert call(mw, "POST", "/v1/completions", bearer("bob")).status == 200
        doc["revoked"].remove("alice")  # and a good file is picked up again
        grants_file.write_text(json.dumps(doc))
        os.utime(grants_file, ns=(0, time.time_ns() + 4_000_000_000))
        assert call(mw, "POST", "/v1/completions", bearer("alice")).status == 200
    finally:
        logger.removeHandler(lines)


def test_broken_file_at_startup_is_an_error(tmp_path):
    path = write_grants(tmp_path, revoke=["x"])
    with pytest.raises(GuardError, match="'revoke'"):
        Authenticator(path)
    with pytest.raises(GuardError, match="missing.json"):
        GrantMiddleware(FakeApp(), str(tmp_path / "missing.json"))


def test_grants_then_masking_in_process_forwards_a_key_whose_salt_ner_flags(tmp_path):
    """The chain as `serve --grants --masking` builds it (grants outermost): a key whose
    derived cache salt spaCy reads as a name must still be served, masked."""
    from vllm_guard.grants.credentials import Grant
    from vllm_guard.grants.middleware import apply_grant
    from vllm_guard.masking.config import MaskingConfig
    from vllm_guard.masking.detection.detector import build_detector
    from vllm_guard.masking.detection.ner import SpacyNerDetector
    from vllm_guard.masking.middleware import MaskingMiddleware

    config = MaskingConfig(detector_workers=0)
    detector = build_detector(config)
    if not any(isinstance(d, SpacyNerDetector) for d in detector.detectors):
        pytest.skip("spaCy NER is not installed")
    name = next((f"tenant-{i}" for i in range(400)
                 if detector.detect(apply_grant({}, Grant(f"key:tenant-{i}",
                                                          frozenset({"add"})))["cache_salt"])),
                None)
    assert name, "no key name's cache salt is read as a sensitive value"
    path = tmp_path / "grants.json"
    path.write_text(json.dumps({"mode": "required", "api_keys": [
        {"name": name, "sha256": hash_api_key("vg-" + name), "tasks": ["add"]}]}))
    app = FakeApp()
    chain = GrantMiddleware(MaskingMiddleware(app, config=config), str(path))
    raw = json.dumps({"model": "m", "prompt": "mail jane.roe@example.com"}).encode()
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
             "headers": [(b"authorization", f"Bearer vg-{name}".encode())]}
    asyncio.run(chain(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    assert status == 200, b"".join(m.get("body", b"") for m in sent)
    forwarded = json.loads(app.calls[0][1])
    assert "jane.roe@example.com" not in forwarded["prompt"]
    assert forwarded["cache_salt"].startswith("vg")
