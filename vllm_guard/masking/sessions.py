"""Sessions belong to a principal: the vault namespace is a MAC, under a server secret, of
(authenticated principal, session id), so nobody can name another user's session.

- With an authenticated principal (grant middleware in front), the client picks its session
  ids freely: the same id under another principal is another namespace.
- Without one, session ids are issued by the server as ``<id>.<mac>``; an id the server did
  not issue (guessed, forged, edited) starts a fresh session instead.
The secret comes from the environment (base64, 32 bytes; required with the Redis vault,
whose replicas must agree) or is random per start (in-memory vault).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets

from vllm_guard.masking.vault import load_env_key

SESSION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def load_session_key(env_name: str, required: bool) -> bytes:
    if not required and not os.environ.get(env_name):
        return os.urandom(32)
    return load_env_key(env_name, "binding sessions to principals across Redis-vault replicas")


class SessionBinder:
    def __init__(self, key: bytes):
        self._ns_key = hmac.new(key, b"vllm-guard session namespace", hashlib.sha256).digest()
        self._id_key = hmac.new(key, b"vllm-guard issued session id", hashlib.sha256).digest()

    def _mac(self, sid: str) -> str:
        digest = hmac.new(self._id_key, sid.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def _issued(self, token: str | None) -> str | None:
        sid, _, mac = (token or "").partition(".")
        if sid and mac and hmac.compare_digest(mac.encode(), self._mac(sid).encode()):
            return sid
        return None

    def resolve(self, principal: str | None, presented: str | None) -> tuple[str, str]:
        """(vault namespace, session token to hand back to the client)."""
        if principal is not None:
            sid = presented if presented and SESSION_ID.fullmatch(presented) else (
                secrets.token_urlsafe(18))
            token, who = sid, f"principal:{principal}"
        else:
            sid = self._issued(presented) or secrets.token_urlsafe(18)
            token, who = f"{sid}.{self._mac(sid)}", "anonymous"
        ns = hmac.new(self._ns_key, f"{who}\x00{sid}".encode(), hashlib.sha256).hexdigest()
        return ns, token


def session_cache_salt(namespace: str, client_salt: str | None) -> str:
    """vLLM's prefix-cache salt when no grant set one: per session, so sessions never share
    KV blocks (a shared cache lets one client time another's prompt prefixes). A salt the
    client sends only narrows it further."""
    own = client_salt or ""
    return "vs" + hashlib.sha256(json.dumps([namespace, own]).encode()).hexdigest()[:40]
