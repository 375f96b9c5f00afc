"""Credentials -> verified task grant.

The grants file (JSON, see ``vllm_guard/configs/grants.example.json``); every key is optional unless
noted, and an unknown key or a value of the wrong type is a load error naming the key::

    {"mode": "required" | "optional",          # optional: no Authorization = anonymous
     "tasks": ["add", "capital"],              # the task names; REQUIRED when "jwt" is set
     "api_keys": [{"name": "alice", "sha256": "<hex of the key>", "tasks": ["add"]}],
     "jwt": {"hs256_secret_file": "...",       # >= 32 bytes; relative to this file
             "eddsa_public_key": "...",        # PEM, relative to this file
             "tasks_claim": "tasks", "audience": null,
             "issuer": null,                   # when set, "iss" must be present and equal
             "max_lifetime_seconds": 3600},    # exp - iat at most this
     "revoked": ["<api key name>", "<api key sha256>", "<jwt jti>", "<jwt sub>"],
     "public_paths": ["/health", "/ping", "/version"],  # need no credential
     "cache_isolation": "principal" | "grant_set"}

API keys are stored hashed (SHA-256 of the bearer token). JWTs need ``exp``, ``iat`` and
``sub``. Task names match ``[A-Za-z0-9_.-]+`` (a comma could smuggle a second task into the
comma-joined grant). The file is re-read when it changes, so revocations apply without a
restart; a changed file that does not load keeps the last good config (one error line), so a
typo never turns the checks off.

``cache_isolation``: ``"principal"`` (default) salts vLLM's prefix cache per caller and grant
set, so no user can time another's prompts through cache hits. ``"grant_set"`` shares cached
blocks between all callers of one grant set (better throughput) at the price of exactly that
timing side channel between them: opt in only when those callers trust each other.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vllm_guard.asgi import RequestError
from vllm_guard.config import ConfigError, load_json_file
from vllm_guard.log import get_logger

logger = get_logger(__name__)

TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # always fullmatch: "$" would accept "add\n"
DEFAULT_PUBLIC_PATHS = ("/health", "/ping", "/version")
# Routes whose body the grant middleware rewrites; they can never be public.
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
CACHE_ISOLATION = ("principal", "grant_set")
MIN_HS256_SECRET_BYTES = 32  # RFC 7518 3.2: at least the hash size
IAT_LEEWAY_S = 30  # clock skew tolerated for iat in the future


def _check_tasks(tasks: tuple[str, ...], what: str) -> None:
    bad = [t for t in tasks if not TASK_NAME.fullmatch(t)]
    if bad:
        raise ValueError(f"{what}: task name {bad[0]!r} must match [A-Za-z0-9_.-]+")


# --- the file, as JSON (strict: built by vllm_guard.config.from_dict) ---------------------


@dataclass(frozen=True)
class ApiKeyEntry:
    name: str
    sha256: str
    tasks: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("'name' must not be empty")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
            raise ValueError(f"'sha256' of API key {self.name!r} must be 64 hex digits")
        _check_tasks(self.tasks, f"'tasks' of API key {self.name!r}")


@dataclass(frozen=True)
class JwtEntry:
    hs256_secret_file: str | None = None
    eddsa_public_key: str | None = None
    tasks_claim: str = "tasks"
    audience: str | None = None
    issuer: str | None = None
    max_lifetime_seconds: int = 3600

    def __post_init__(self) -> None:
        if not (self.hs256_secret_file or self.eddsa_public_key):
            raise ValueError("needs 'hs256_secret_file' or 'eddsa_public_key' (remove 'jwt' "
                             "to accept API keys only)")
        if self.max_lifetime_seconds <= 0:
            raise ValueError("'max_lifetime_seconds' must be positive")
        if not self.tasks_claim:
            raise ValueError("'tasks_claim' must not be empty")
        if self.issuer == "":
            raise ValueError("'issuer' must not be empty (null to accept any)")


@dataclass(frozen=True)
class GrantsFile:
    mode: str = "required"
    tasks: tuple[str, ...] | None = None
    api_keys: tuple[ApiKeyEntry, ...] = ()
    jwt: JwtEntry | None = None
    revoked: tuple[str, ...] = ()
    public_paths: tuple[str, ...] = DEFAULT_PUBLIC_PATHS
    cache_isolation: str = "principal"

    def __post_init__(self) -> None:
        if self.mode not in ("required", "optional"):
            raise ValueError(f"'mode' must be 'required' or 'optional', not {self.mode!r}")
        if self.cache_isolation not in CACHE_ISOLATION:
            raise ValueError(f"'cache_isolation' must be one of {list(CACHE_ISOLATION)}, "
                             f"not {self.cache_isolation!r}")
        if self.tasks is not None:
            _check_tasks(self.tasks, "'tasks'")
        elif self.jwt is not None:
            # JWT task claims come from outside this file: only listed names are honoured
            raise ValueError("'tasks' (the list of task names) is required when 'jwt' is set")
        names = [k.name for k in self.api_keys]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"API key 'name' {dup!r} appears twice")
        digests = [k.sha256.lower() for k in self.api_keys]
        if len(set(digests)) != len(digests):
            raise ValueError("two API keys have the same 'sha256'")
        for p in self.public_paths:
            if not p.startswith("/"):
                raise ValueError(f"'public_paths' entry {p!r} must start with '/'")
            if (p.rstrip("/") or "/") in GENERATION_ROUTES:
                raise ValueError(f"'public_paths' entry {p!r} is a generation route: it "
                                 "cannot be served without a grant")


# --- runtime objects ------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    principal: str | None  # None: anonymous (optional mode, public paths)
    tasks: frozenset[str]

    @property
    def key(self) -> str:
        return ",".join(sorted(self.tasks))


ANONYMOUS = Grant(None, frozenset())


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
    issuer: str | None = None
    max_lifetime_seconds: int = 3600


@dataclass(frozen=True)
class GrantsConfig:
    mode: str = "required"
    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtConfig | None = None
    revoked: frozenset[str] = frozenset()
    known_tasks: frozenset[str] | None = None
    public_paths: frozenset[str] = frozenset(DEFAULT_PUBLIC_PATHS)
    cache_isolation: str = "principal"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GrantsConfig:
        """Read and validate; every problem is a :class:`ConfigError` (a ``GuardError``) of
        one line naming the file and the key."""
        p = Path(path)
        return cls.from_file(load_json_file(GrantsFile, p, "grants file"), p.parent,
                             f"grants file {p}")

    @classmethod
    def from_file(cls, f: GrantsFile, base: Path, where: str) -> GrantsConfig:
        keys = tuple(ApiKey(k.name, k.sha256.lower(), frozenset(k.tasks)) for k in f.api_keys)
        return cls(f.mode, keys, _jwt_config(f.jwt, base, where) if f.jwt else None,
                   frozenset(f.revoked), frozenset(f.tasks) if f.tasks is not None else None,
                   frozenset(p.rstrip("/") or "/" for p in f.public_paths), f.cache_isolation)


def _read(base: Path, name: str, key: str, where: str) -> bytes:
    path = base / name
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: jwt.{key!r}: cannot read {path}: {e.strerror or e}") \
            from None


def _jwt_config(j: JwtEntry, base: Path, where: str) -> JwtConfig:
    secret = None
    if j.hs256_secret_file:
        secret = _read(base, j.hs256_secret_file, "hs256_secret_file", where).strip()
        if len(secret) < MIN_HS256_SECRET_BYTES:
            raise ConfigError(f"{where}: jwt.'hs256_secret_file' holds {len(secret)} bytes; "
                              f"HS256 needs at least {MIN_HS256_SECRET_BYTES}")
    public = None
    if j.eddsa_public_key:
        pem = _read(base, j.eddsa_public_key, "eddsa_public_key", where)
        try:
            public = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ConfigError(f"{where}: jwt.'eddsa_public_key' is not a PEM public key: "
                              f"{e}".splitlines()[0]) from None
        if not isinstance(public, Ed25519PublicKey | Ed448PublicKey):
            raise ConfigError(f"{where}: jwt.'eddsa_public_key' must be an Ed25519 or Ed448 "
                              "public key")
    return JwtConfig(secret, public, j.tasks_claim, j.audience, j.issuer,
                     j.max_lifetime_seconds)


def hash_api_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_api_key() -> str:
    return "vg-" + secrets.token_urlsafe(24)


def _unauthorized(message: str, code: str = "invalid_credentials") -> RequestError:
    return RequestError(401, message, code, "authentication_error")


def _unknown_task(tasks: object) -> RequestError:
    return RequestError(403, f"credential grants unknown task(s) {tasks}", "unknown_task",
                        "permission_error")


def _number(v: object) -> bool:
    # finite: Python's JSON reads NaN, and a NaN iat would pass every comparison below
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class Authenticator:
    """Maps an ``Authorization`` header to a :class:`Grant`; reloads its file on change."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._seen = self._signature()
        self.config = GrantsConfig.load(self.path)  # at startup a bad file is an error

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self) -> GrantsConfig:
        """The current config: re-read if the file changed. A changed file that fails to
        load keeps the last good config and logs one error line (once per change)."""
        sig = self._signature()
        if sig != self._seen:
            self._seen = sig
            try:
                if sig is None:
                    raise ConfigError(f"grants file {self.path} is missing")
                self.config = GrantsConfig.load(self.path)
                logger.info("vllm-guard grants: reloaded %s", self.path)
            except Exception as e:  # anything: a reload must never take the old checks away
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                logger.error("vllm-guard grants: %s; still serving the last good grants file",
                             msg)
        return self.config

    def authenticate(self, authorization: str | None,
                     cfg: GrantsConfig | None = None) -> Grant:
        cfg = self.reload() if cfg is None else cfg
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
        grant = self._jwt(token, cfg) if token.count(".") == 2 else self._api_key(token, cfg)
        if cfg.known_tasks is not None and not grant.tasks <= cfg.known_tasks:
            raise _unknown_task(sorted(grant.tasks - cfg.known_tasks))
        return grant

    @staticmethod
    def _api_key(token: str, cfg: GrantsConfig) -> Grant:
        digest = hash_api_key(token)
        for key in cfg.api_keys:
            if hmac.compare_digest(key.sha256, digest):
                if key.name in cfg.revoked or digest in cfg.revoked:
                    raise _unauthorized("API key has been revoked", "revoked_credentials")
                return Grant(f"key:{key.name}", key.tasks)
        raise _unauthorized("unknown API key")

    @staticmethod
    def _jwt(token: str, cfg: GrantsConfig) -> Grant:
        j = cfg.jwt
        if j is None:
            raise _unauthorized("JWTs are not accepted by this server")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            key = {"HS256": j.hs256_secret, "EdDSA": j.eddsa_public_key}.get(alg) \
                if isinstance(alg, str) else None
            if key is None:
                raise _unauthorized(f"JWT algorithm {alg!r} is not accepted")
            required = ["exp", "iat", "sub", *(["iss"] if j.issuer is not None else [])]
            # iat is checked below, with a leeway that must not stretch exp as well
            claims = jwt.decode(token, key, algorithms=[alg], audience=j.audience,
                                issuer=j.issuer, options={"require": required,
                                                          "verify_iat": False})
        except jwt.ExpiredSignatureError:
            raise _unauthorized("JWT has expired", "expired_credentials") from None
        except jwt.MissingRequiredClaimError as e:
            raise _unauthorized(f"JWT lacks the required {e.claim!r} claim") from None
        except jwt.InvalidIssuerError:
            raise _unauthorized("JWT issuer is not accepted") from None
        except jwt.PyJWTError as e:
            raise _unauthorized(f"invalid JWT: {type(e).__name__}") from None
        iat, exp, sub, iss = claims["iat"], claims["exp"], claims["sub"], claims.get("iss")
        if not (_number(iat) and _number(exp)):
            raise _unauthorized("JWT 'iat' and 'exp' must be numbers")
        if iat > time.time() + IAT_LEEWAY_S:
            raise _unauthorized("JWT 'iat' is in the future")
        if exp - iat > j.max_lifetime_seconds:
            raise _unauthorized(f"JWT lifetime exp - iat exceeds {j.max_lifetime_seconds} s")
        # sub ties the token to a user (principal: per-user vaults and prefix cache)
        if not isinstance(sub, str) or not sub:
            raise _unauthorized("JWT 'sub' must be a non-empty string")
        if iss is not None and not isinstance(iss, str):
            raise _unauthorized("JWT 'iss' must be a string")
        jti = claims.get("jti")
        if sub in cfg.revoked or (isinstance(jti, str) and jti in cfg.revoked):
            raise _unauthorized("JWT has been revoked", "revoked_credentials")
        tasks = claims.get(j.tasks_claim, [])
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise _unauthorized(f"JWT claim {j.tasks_claim!r} must be a list of task names")
        bad = [t for t in tasks if not TASK_NAME.fullmatch(t)
               or (cfg.known_tasks is not None and t not in cfg.known_tasks)]
        if bad:
            raise _unknown_task(bad)
        # "|" and "%" escaped in iss, so distinct (iss, sub) pairs never share a principal
        who = (iss or "").replace("%", "%25").replace("|", "%7C")
        return Grant(f"jwt:{who}|{sub}", frozenset(tasks))
