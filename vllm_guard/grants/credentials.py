"""Credentials -> verified task grant.

The grants file (JSON, see ``configs/grants.example.json``)::

    {"mode": "required" | "optional",
     "api_keys": [{"name": "alice", "sha256": "<hex of the key>", "tasks": ["add"]}],
     "jwt": {"hs256_secret_file": "...", "eddsa_public_key": "...", "tasks_claim": "tasks",
             "audience": null},
     "revoked": ["<api key name>", "<jwt jti>", "<jwt sub>"]}

API keys are stored hashed (SHA-256 of the bearer token). JWTs need ``exp``. The file is
re-read when it changes, so revocations apply without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization

from vllm_guard.asgi import RequestError
from vllm_guard.errors import GuardError


@dataclass(frozen=True)
class Grant:
    principal: str
    tasks: frozenset[str]

    @property
    def key(self) -> str:
        return ",".join(sorted(self.tasks))


ANONYMOUS = Grant("anonymous", frozenset())


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    tasks: frozenset[str]


@dataclass(frozen=True)
class JwtConfig:
    hs256_secret: bytes | None = field(default=None, repr=False)
    eddsa_public_key: object | None = None
    tasks_claim: str = "tasks"
    audience: str | None = None


@dataclass(frozen=True)
class GrantsConfig:
    mode: str = "required"
    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtConfig | None = None
    revoked: frozenset[str] = frozenset()
    known_tasks: frozenset[str] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GrantsConfig:
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
            mode = doc.get("mode", "required")
            if mode not in ("required", "optional"):
                raise ValueError(f"mode must be 'required' or 'optional', not {mode!r}")
            keys = tuple(ApiKey(k["name"], k["sha256"].lower(), frozenset(k["tasks"]))
                         for k in doc.get("api_keys", []))
            jwt_cfg = _jwt_config(doc["jwt"], p.parent) if doc.get("jwt") else None
            known = doc.get("tasks")
            return cls(mode, keys, jwt_cfg, frozenset(doc.get("revoked", [])),
                       frozenset(known) if known is not None else None)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GuardError(f"cannot load grants file {p}: {e}") from None


def _jwt_config(doc: dict, base: Path) -> JwtConfig:
    secret = None
    if doc.get("hs256_secret_file"):
        secret = (base / doc["hs256_secret_file"]).read_bytes().strip()
    public = None
    if doc.get("eddsa_public_key"):
        public = serialization.load_pem_public_key((base / doc["eddsa_public_key"]).read_bytes())
    return JwtConfig(secret, public, doc.get("tasks_claim", "tasks"), doc.get("audience"))


def hash_api_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_api_key() -> str:
    return "vg-" + secrets.token_urlsafe(24)


def _unauthorized(message: str, code: str = "invalid_credentials") -> RequestError:
    return RequestError(401, message, code, "authentication_error")


class Authenticator:
    """Maps an ``Authorization`` header to a :class:`Grant`; reloads its file on change."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._mtime = -1.0
        self.config = GrantsConfig()
        self.reload()

    def reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except OSError as e:
            raise GuardError(f"grants file {self.path} is missing: {e.strerror}") from None
        if mtime != self._mtime:
            self.config = GrantsConfig.load(self.path)
            self._mtime = mtime

    def authenticate(self, authorization: str | None) -> Grant:
        self.reload()
        cfg = self.config
        if authorization is None:
            if cfg.mode == "optional":
                return ANONYMOUS
            raise _unauthorized("missing Authorization header (Bearer API key or JWT)",
                                "missing_credentials")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise _unauthorized("malformed Authorization header: expected 'Bearer <token>'",
                                "malformed_credentials")
        grant = self._jwt(token) if token.count(".") == 2 else self._api_key(token)
        if cfg.known_tasks is not None and not grant.tasks <= cfg.known_tasks:
            raise RequestError(403, "credential grants unknown task(s) "
                               f"{sorted(grant.tasks - cfg.known_tasks)}", "unknown_task",
                               "permission_error")
        return grant

    def _api_key(self, token: str) -> Grant:
        digest = hash_api_key(token)
        for key in self.config.api_keys:
            if hmac.compare_digest(key.sha256, digest):
                if key.name in self.config.revoked or digest in self.config.revoked:
                    raise _unauthorized("API key has been revoked", "revoked_credentials")
                return Grant(key.name, key.tasks)
        raise _unauthorized("unknown API key")

    def _jwt(self, token: str) -> Grant:
        cfg = self.config.jwt
        if cfg is None:
            raise _unauthorized("JWTs are not accepted by this server")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            key = {"HS256": cfg.hs256_secret, "EdDSA": cfg.eddsa_public_key}.get(alg)
            if key is None:
                raise _unauthorized(f"JWT algorithm {alg!r} is not accepted")
            claims = jwt.decode(token, key, algorithms=[alg], audience=cfg.audience,
                                options={"require": ["exp"]})
        except jwt.ExpiredSignatureError:
            raise _unauthorized("JWT has expired", "expired_credentials") from None
        except jwt.PyJWTError as e:
            raise _unauthorized(f"invalid JWT: {type(e).__name__}") from None
        for claim in ("jti", "sub"):
            if claims.get(claim) and claims[claim] in self.config.revoked:
                raise _unauthorized("JWT has been revoked", "revoked_credentials")
        tasks = claims.get(cfg.tasks_claim, [])
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise _unauthorized(f"JWT claim {cfg.tasks_claim!r} must be a list of task names")
        return Grant(str(claims.get("sub", "jwt")), frozenset(tasks))
