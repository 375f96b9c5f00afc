"""The vault: per session, value <-> placeholder. In memory (default) or Redis.

Redis layout, all keys namespaced ``vg:<sha256(session)>:`` and expiring after the TTL:
- ``...:p2v`` hash: placeholder -> AES-256-GCM(value), AAD = session digest + placeholder;
- ``...:v2p`` hash: HMAC-SHA256(value) -> placeholder (same value, same placeholder, and no
  plaintext or unkeyed hash of a value ever stored);
- ``...:n`` hash: entity -> last number used.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vllm_guard.errors import GuardError


class VaultUnavailable(GuardError):
    """The vault cannot be reached: fail closed (503), never forward the unmasked prompt."""


class Vault(ABC):
    @abstractmethod
    async def assign(self, session: str, entity: str, value: str) -> str:
        """The placeholder for ``value`` in ``session`` (a new one if unseen)."""

    @abstractmethod
    async def mapping(self, session: str) -> dict[str, str]:
        """placeholder -> value for the session."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


def placeholder(entity: str, number: int) -> str:
    return f"<{entity}_{number}>"


@dataclass
class _Session:
    values: dict[str, str] = field(default_factory=dict)  # placeholder -> value
    by_value: dict[tuple[str, str], str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    expires: float = 0.0


class InMemoryVault(Vault):
    """Per process; TTL per session and a bound on the number of sessions (LRU)."""

    def __init__(self, ttl_seconds: int = 3600, max_sessions: int = 10_000):
        self.ttl, self.max_sessions = ttl_seconds, max_sessions
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = asyncio.Lock()

    def _get(self, session: str) -> _Session:
        now = time.monotonic()
        s = self._sessions.get(session)
        if s is None or s.expires < now:
            s = self._sessions[session] = _Session()
        self._sessions.move_to_end(session)
        s.expires = now + self.ttl
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return s

    async def assign(self, session: str, entity: str, value: str) -> str:
        async with self._lock:
            s = self._get(session)
            found = s.by_value.get((entity, value))
            if found is None:
                s.counters[entity] = s.counters.get(entity, 0) + 1
                found = placeholder(entity, s.counters[entity])
                s.by_value[(entity, value)] = found
                s.values[found] = value
            return found

    async def mapping(self, session: str) -> dict[str, str]:
        async with self._lock:
            return dict(self._get(session).values)


def load_vault_key(env_name: str) -> bytes:
    raw = os.environ.get(env_name)
    if not raw:
        raise GuardError(f"the Redis vault needs a 32-byte AES key, base64, in ${env_name}")
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError:
        raise GuardError(f"${env_name} is not valid base64") from None
    if len(key) != 32:
        raise GuardError(f"${env_name} must decode to 32 bytes, got {len(key)}")
    return key


class RedisVault(Vault):
    """Shared by API-server processes and replicas; values encrypted under a server key."""

    def __init__(self, url: str, key: bytes, ttl_seconds: int = 3600):
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        self.aead = AESGCM(key)
        self.mac_key = hmac.new(key, b"vllm-guard vault value mac", hashlib.sha256).digest()
        self.ttl = ttl_seconds

    @staticmethod
    def _ns(session: str) -> str:
        return "vg:" + hashlib.sha256(session.encode()).hexdigest()[:32]

    async def _call(self, coro):
        from redis.exceptions import RedisError

        try:
            return await coro
        except (RedisError, OSError) as e:
            raise VaultUnavailable(f"vault (Redis) unavailable: {type(e).__name__}") from None

    async def assign(self, session: str, entity: str, value: str) -> str:
        ns = self._ns(session)
        mac = hmac.new(self.mac_key, f"{entity}\x00{value}".encode(), hashlib.sha256).hexdigest()
        found = await self._call(self.redis.hget(f"{ns}:v2p", mac))
        if found is not None:
            return found.decode()
        number = await self._call(self.redis.hincrby(f"{ns}:n", entity, 1))
        ph = placeholder(entity, number)
        nonce = os.urandom(12)
        sealed = nonce + self.aead.encrypt(nonce, value.encode(), f"{ns}|{ph}".encode())
        # HSETNX: two racing requests with the same new value keep one placeholder.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(f"{ns}:v2p", mac, ph)
            pipe.hget(f"{ns}:v2p", mac)
            for k in ("p2v", "v2p", "n"):
                pipe.expire(f"{ns}:{k}", self.ttl)
            _, winner, *_ = await self._call(pipe.execute())
        ph = winner.decode()
        await self._call(self.redis.hsetnx(f"{ns}:p2v", ph, sealed))
        return ph

    async def mapping(self, session: str) -> dict[str, str]:
        ns = self._ns(session)
        raw = await self._call(self.redis.hgetall(f"{ns}:p2v"))
        out = {}
        for ph, sealed in raw.items():
            ph = ph.decode()
            try:
                plain = self.aead.decrypt(sealed[:12], sealed[12:], f"{ns}|{ph}".encode())
                out[ph] = plain.decode()
            except (InvalidTag, ValueError):
                continue  # tampered or foreign entry: never restore it
        return out

    async def close(self) -> None:
        await self.redis.aclose()
