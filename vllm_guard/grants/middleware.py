"""ASGI middleware (``--middleware vllm_guard.grants.middleware.GrantMiddleware``).

request -> authenticate from the headers alone (API key / JWT / revocation), before any body
is read -> set ``scope[PRINCIPAL_KEY]`` -> for generation routes: strip any client grant
field, set ``vllm_xargs.vllm_guard_grant`` and ``cache_salt`` from the verified grant -> vLLM.

Every route and WebSocket needs a credential except the grants file's ``public_paths``.
Authenticated reads (GET/HEAD/OPTIONS) and ``/tokenize``/``/detokenize`` pass through; other
POSTs are refused. 401 for missing/unknown/expired/malformed credentials, 403 for a missing
grant or a refused endpoint; OpenAI error JSON. An unauthenticated WebSocket is closed before
it is accepted (the client sees HTTP 403).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass

from vllm_guard import envs
from vllm_guard.asgi import (
    PRINCIPAL_KEY,
    SERVER_SET_KEY,
    TRANSFER_FIELDS,
    ASGIApp,
    JsonRequestMiddleware,
    Receive,
    RequestError,
    Scope,
    Send,
    header,
    route_path,
    send_error,
)
from vllm_guard.errors import GuardError
from vllm_guard.grants.credentials import (
    ANONYMOUS,
    GENERATION_ROUTES,
    Authenticator,
    Grant,
)
from vllm_guard.runtime import GRANT_XARG

NARROW_HEADER = b"x-vllm-guard-tasks"
GRANT_LIKE = re.compile(r"guard|grant|task", re.IGNORECASE)
# POST endpoints that run no generation; every other POST would bypass the grant check.
SAFE_POSTS = ("/tokenize", "/detokenize", "/ping")
READ_ONLY = ("GET", "HEAD", "OPTIONS")
# Private scope key: what admit() verified, for rewrite() (same request, same config).
ADMITTED_KEY = "vllm_guard.grants.admitted"


@dataclass(frozen=True)
class Admitted:
    grant: Grant
    cache_isolation: str


def cache_salt(grant: Grant, client_salt: object, isolation: str = "principal") -> str:
    """Never shares prefix-cache blocks across grant sets; by default not across principals
    either (a shared cache lets one user time another's prompt prefixes)."""
    own = client_salt if isinstance(client_salt, str) else ""
    if isolation == "grant_set":
        who = ""
    elif grant.principal is not None:
        who = grant.principal
    else:
        # anonymous callers cannot be told apart: they reuse cache only under a salt of
        # their own (a secret they share), never by default
        who = "anonymous:" + (own or secrets.token_hex(16))
    seed = json.dumps([isolation, who, grant.key, own])  # unambiguous, unlike a join
    return "vg" + hashlib.sha256(seed.encode()).hexdigest()[:40]


SERVER_SET = frozenset({"cache_salt", f"vllm_xargs.{GRANT_XARG}"})  # what apply_grant writes


def apply_grant(body: dict, grant: Grant, isolation: str = "principal") -> dict:
    xargs = body.get("vllm_xargs")
    if xargs is None:
        xargs = {}
    if not isinstance(xargs, dict):
        raise RequestError(400, "vllm_xargs must be an object", "invalid_vllm_xargs")
    for field in TRANSFER_FIELDS:
        if body.get(field) or xargs.get(field):
            raise RequestError(400, f"{field} is not allowed", "transfer_not_allowed")
    clean = {k: v for k, v in xargs.items() if not GRANT_LIKE.search(k)}
    clean[GRANT_XARG] = grant.key
    out = {k: v for k, v in body.items() if not k.startswith("vllm_guard")}
    out["vllm_xargs"] = clean
    out["cache_salt"] = cache_salt(grant, body.get("cache_salt"), isolation)
    return out


def _forbidden(message: str, code: str) -> RequestError:
    return RequestError(403, message, code, "permission_error")


class GrantMiddleware(JsonRequestMiddleware):
    def __init__(self, app: ASGIApp, grants_file: str | None = None):
        super().__init__(app)
        path = grants_file or envs.get(envs.GRANTS)
        if not path:
            raise GuardError(f"GrantMiddleware needs a grants file: set {envs.GRANTS}")
        self.auth = Authenticator(path)

    def handles(self, scope: Scope) -> bool:
        return (scope.get("type") == "http" and scope.get("method") == "POST"
                and route_path(scope) in GENERATION_ROUTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "websocket":
            try:
                await self.admit(scope)
            except RequestError:
                # closing before websocket.accept makes the server answer HTTP 403
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        await super().__call__(scope, receive, send)  # lifespan passes through there

    async def admit(self, scope: Scope) -> None:
        """Authenticate from the headers alone; runs before any body is read."""
        # nothing upstream may pose as a principal or as an admitted grant
        scope.pop(PRINCIPAL_KEY, None)
        scope.pop(ADMITTED_KEY, None)
        scope.pop(SERVER_SET_KEY, None)
        cfg = self.auth.reload()  # one config snapshot for the whole request
        if route_path(scope) in cfg.public_paths:
            grant = ANONYMOUS  # never a generation route (refused at load)
        else:
            grant = self.auth.authenticate(header(scope, b"authorization"), cfg)
        if grant.principal is not None:
            scope[PRINCIPAL_KEY] = grant.principal
        if self.handles(scope):
            grant = self._narrow(scope, grant)
            if cfg.mode == "required" and not grant.tasks:
                raise _forbidden("this credential grants no task", "missing_grant")
        scope[ADMITTED_KEY] = Admitted(grant, cfg.cache_isolation)

    @staticmethod
    def _narrow(scope: Scope, grant: Grant) -> Grant:
        narrow = header(scope, NARROW_HEADER)
        if narrow is None:
            return grant
        asked = frozenset(t.strip() for t in narrow.split(",") if t.strip())
        if not asked <= grant.tasks:
            raise _forbidden(f"task(s) {sorted(asked - grant.tasks)} not granted to this "
                             "credential", "missing_grant")
        return Grant(grant.principal, asked)

    async def rewrite(self, scope: Scope, body: dict, send: Send) -> tuple[dict, Send]:
        admitted: Admitted = scope[ADMITTED_KEY]
        scope[SERVER_SET_KEY] = SERVER_SET
        return apply_grant(body, admitted.grant, admitted.cache_isolation), send

    async def other(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.admit(scope)
            if scope.get("method") not in READ_ONLY and route_path(scope) not in SAFE_POSTS:
                raise _forbidden(f"{scope.get('method')} {route_path(scope)} is not served "
                                 "under vllm-guard grants", "endpoint_not_allowed")
        except RequestError as e:
            return await send_error(send, e)
        await self.app(scope, receive, send)
