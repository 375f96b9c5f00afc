"""ASGI middleware (``--middleware vllm_guard.grants.middleware.GrantMiddleware``).

request -> authenticate (API key / JWT / revocation) -> strip any client grant field ->
set ``vllm_xargs.vllm_guard_grant`` and ``cache_salt`` from the verified grant -> vLLM.
401 for unknown/expired/malformed credentials, 403 for a missing grant; OpenAI error JSON.
"""

from __future__ import annotations

import hashlib
import os
import re

from vllm_guard.asgi import (
    ASGIApp,
    JsonRequestMiddleware,
    Receive,
    RequestError,
    Scope,
    Send,
    header,
    send_error,
)
from vllm_guard.errors import GuardError
from vllm_guard.grants import GRANT_ENV, GRANT_XARG
from vllm_guard.grants.credentials import Authenticator, Grant

NARROW_HEADER = b"x-vllm-guard-tasks"
GRANT_LIKE = re.compile(r"guard|grant|task", re.IGNORECASE)
# POST endpoints that run no generation; every other POST would bypass the grant check.
SAFE_POSTS = ("/tokenize", "/detokenize")


def cache_salt(grant: Grant, client_salt: object) -> str:
    """Per grant set, so the prefix cache never shares KV blocks across grant sets."""
    seed = f"{grant.key}\x00{client_salt if isinstance(client_salt, str) else ''}"
    return "vg" + hashlib.sha256(seed.encode()).hexdigest()[:40]


def apply_grant(body: dict, grant: Grant) -> dict:
    xargs = body.get("vllm_xargs")
    if xargs is None:
        xargs = {}
    if not isinstance(xargs, dict):
        raise RequestError(400, "vllm_xargs must be an object", "invalid_vllm_xargs")
    clean = {k: v for k, v in xargs.items() if not GRANT_LIKE.search(k)}
    clean[GRANT_XARG] = grant.key
    out = {k: v for k, v in body.items() if not k.startswith("vllm_guard")}
    out["vllm_xargs"] = clean
    out["cache_salt"] = cache_salt(grant, body.get("cache_salt"))
    return out


class GrantMiddleware(JsonRequestMiddleware):
    def __init__(self, app: ASGIApp, grants_file: str | None = None):
        super().__init__(app)
        path = grants_file or os.environ.get(GRANT_ENV)
        if not path:
            raise GuardError(f"GrantMiddleware needs a grants file: set {GRANT_ENV}")
        self.auth = Authenticator(path)

    def grant_for(self, scope: Scope) -> Grant:
        grant = self.auth.authenticate(header(scope, b"authorization"))
        narrow = header(scope, NARROW_HEADER)
        if narrow is not None:
            asked = frozenset(t.strip() for t in narrow.split(",") if t.strip())
            if not asked <= grant.tasks:
                raise RequestError(403, f"task(s) {sorted(asked - grant.tasks)} not granted to "
                                   "this credential", "missing_grant", "permission_error")
            grant = Grant(grant.principal, asked)
        if self.auth.config.mode == "required" and not grant.tasks:
            raise RequestError(403, "this credential grants no task", "missing_grant",
                               "permission_error")
        return grant

    async def rewrite(self, scope: Scope, body: dict, send: Send) -> tuple[dict, Send]:
        return apply_grant(body, self.grant_for(scope)), send

    async def other(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") == "POST" and scope.get("path") not in SAFE_POSTS:
            return await send_error(send, RequestError(
                403, "endpoint not served under vllm-guard grants", "endpoint_not_allowed",
                "permission_error"))
        await self.app(scope, receive, send)
