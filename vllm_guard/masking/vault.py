"""The vault: per namespace (principal + session), value <-> placeholder. In memory or Redis.

Redis: ONE hash per session, ``vg:<sha256(namespace)[:32]>``, expiring after the TTL as a
whole (so a placeholder number is never reused while a value under it survives):
- ``n:<ENTITY>`` last number used for the entity; ``t`` placeholders in the session (the cap);
- ``p:<placeholder>`` nonce + AES-256-GCM(value), AAD = key | entity | MAC;
- ``v:<MAC>`` -> placeholder, MAC = HMAC-SHA256(key namespace, entity, value) under a key
  derived from the server key (no plaintext or unkeyed hash of a value is ever stored).
All writes of a request and the EXPIRE run in one Lua script (atomic, all or nothing).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vllm_guard.aead import seal, unseal
from vllm_guard.errors import GuardError

T = TypeVar("T")


class VaultUnavailable(GuardError):
    """The vault cannot be reached: fail closed (503), never forward the unmasked prompt."""


class VaultFull(GuardError):
    """The session would exceed its cap of placeholders; nothing of the request was stored."""


class Vault(ABC):
    @abstractmethod
    async def assign_many(self, namespace: str, items: list[tuple[str, str]]) -> list[str]:
        """Placeholders for (entity, value) pairs, in order; new values get the next number.

        Raises :class:`VaultFull` (and stores nothing) past the per-session cap."""

    async def assign(self, namespace: str, entity: str, value: str) -> str:
        """The placeholder for one value (a new one if unseen)."""
        return (await self.assign_many(namespace, [(entity, value)]))[0]

    @abstractmethod
    async def mapping(self, namespace: str) -> dict[str, str]:
        """placeholder -> value for the session (empty once expired); refreshes its TTL."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


def placeholder(entity: str, number: int) -> str:
    return f"<{entity}_{number}>"


_PLACEHOLDER = re.compile(r"<(.+)_([1-9][0-9]*)>")


def _full(cap: int) -> VaultFull:
    return VaultFull(f"the session would exceed its cap of {cap} placeholders")


@dataclass
class _Session:
    values: dict[str, str] = field(default_factory=dict)  # placeholder -> value
    by_value: dict[tuple[str, str], str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    expires: float = 0.0


class InMemoryVault(Vault):
    """Per process; TTL per session, a cap per session, and a bound on sessions (LRU)."""

    def __init__(self, ttl_seconds: float = 3600, max_sessions: int = 10_000,
                 max_entries: int = 2_000):
        self.ttl, self.max_sessions, self.max_entries = ttl_seconds, max_sessions, max_entries
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = asyncio.Lock()

    def _live(self, namespace: str, now: float) -> _Session | None:
        # LRU order is also expiry order (every touch sets now + ttl): purge from the front.
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.expires > now:
                break
            self._sessions.popitem(last=False)
        return self._sessions.get(namespace)

    def _touch(self, namespace: str, s: _Session, now: float) -> None:
        s.expires = now + self.ttl
        self._sessions[namespace] = s
        self._sessions.move_to_end(namespace)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    async def assign_many(self, namespace: str, items: list[tuple[str, str]]) -> list[str]:
        if not items:
            return []  # never creates (nor evicts for) a session: requests without values
        async with self._lock:
            now = time.monotonic()
            s = self._live(namespace, now) or _Session()
            new = [k for k in dict.fromkeys(items) if k not in s.by_value]
            if len(s.values) + len(new) > self.max_entries:
                raise _full(self.max_entries)  # before any write, not even a new session
            for entity, value in new:
                s.counters[entity] = s.counters.get(entity, 0) + 1
                ph = placeholder(entity, s.counters[entity])
                s.by_value[(entity, value)] = ph
                s.values[ph] = value
            self._touch(namespace, s, now)
            return [s.by_value[k] for k in items]

    async def mapping(self, namespace: str) -> dict[str, str]:
        async with self._lock:
            now = time.monotonic()
            s = self._live(namespace, now)
            if s is None:
                return {}  # reading never creates (nor evicts for) a session
            self._touch(namespace, s, now)
            return dict(s.values)


def load_env_key(env_name: str, purpose: str) -> bytes:
    """A 32-byte key, base64, from ``$env_name`` (one-line errors saying what it is for)."""
    raw = os.environ.get(env_name)
    if not raw:
        raise GuardError(f"{purpose} needs 32 random bytes, base64, in ${env_name}")
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError:
        raise GuardError(f"${env_name} is not valid base64") from None
    if len(key) != 32:
        raise GuardError(f"${env_name} must decode to 32 bytes, got {len(key)}")
    return key


def load_vault_key(env_name: str) -> bytes:
    return load_env_key(env_name, "the Redis vault's AES key")


# KEYS[1]: the session hash. ARGV: ttl, cap, then (entity, mac, sealed) per distinct item.
# Returns the placeholders in order, or -1 (nothing written) past the cap.
_ASSIGN_LUA = """
local key, ttl, cap = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local out, new = {}, {}
for i = 3, #ARGV, 3 do
  local ph = redis.call('HGET', key, 'v:' .. ARGV[i + 1])
  out[#out + 1] = ph
  if not ph then new[#new + 1] = i end
end
if #new > 0 then
  if tonumber(redis.call('HGET', key, 't') or '0') + #new > cap then
    return -1
  end
  for _, i in ipairs(new) do
    local n = redis.call('HINCRBY', key, 'n:' .. ARGV[i], 1)
    local ph = '<' .. ARGV[i] .. '_' .. n .. '>'  -- as placeholder() in Python
    redis.call('HSET', key, 'p:' .. ph, ARGV[i + 2], 'v:' .. ARGV[i + 1], ph)
    out[(i - 3) / 3 + 1] = ph
  end
  redis.call('HINCRBY', key, 't', #new)
end
redis.call('EXPIRE', key, ttl)
return out
"""


class RedisVault(Vault):
    """Shared by API-server processes and replicas; values encrypted under a server key."""

    def __init__(self, url: str, key: bytes, ttl_seconds: int = 3600, max_entries: int = 2_000):
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        self._assign = self.redis.register_script(_ASSIGN_LUA)
        self.aead = AESGCM(key)
        self.mac_key = hmac.new(key, b"vllm-guard vault value mac", hashlib.sha256).digest()
        self.ttl, self.max_entries = int(ttl_seconds), max_entries

    @staticmethod
    def _key(namespace: str) -> str:
        return "vg:" + hashlib.sha256(namespace.encode()).hexdigest()[:32]

    def _mac(self, key: str, entity: str, value: str) -> str:
        # Keyed by session too: the same value in two sessions is not linkable in Redis.
        msg = f"{key}\x00{entity}\x00{value}".encode()
        return hmac.new(self.mac_key, msg, hashlib.sha256).hexdigest()

    @staticmethod
    async def _call(aw: Awaitable[T]) -> T:
        from redis.exceptions import RedisError

        try:
            return await aw
        except (RedisError, OSError) as e:
            raise VaultUnavailable(f"vault (Redis) unavailable: {type(e).__name__}") from None

    async def assign_many(self, namespace: str, items: list[tuple[str, str]]) -> list[str]:
        if not items:
            return []
        key = self._key(namespace)
        distinct = list(dict.fromkeys(items))
        args: list[str | bytes | int] = [self.ttl, self.max_entries]
        for entity, value in distinct:
            mac = self._mac(key, entity, value)
            # The number is only known inside the script, so the AAD binds the MAC instead.
            sealed = seal(self.aead, value.encode(), f"{key}|{entity}|{mac}".encode())
            args += [entity, mac, sealed]
        res = await self._call(self._assign(keys=[key], args=args))
        if not isinstance(res, list):
            raise _full(self.max_entries)
        table = {k: ph.decode() for k, ph in zip(distinct, res, strict=True)}
        return [table[k] for k in items]

    async def mapping(self, namespace: str) -> dict[str, str]:
        key = self._key(namespace)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            pipe.expire(key, self.ttl)
            raw, _ = await self._call(pipe.execute())
        macs: dict[str, str | None] = {}  # placeholder -> the MAC pointing to it
        for f, v in raw.items():
            if f.startswith(b"v:"):
                ph = v.decode()
                macs[ph] = None if ph in macs else f[2:].decode()  # two MACs: tampered
        out = {}
        for f, sealed in raw.items():
            if not f.startswith(b"p:"):
                continue
            ph = f[2:].decode()
            m, mac = _PLACEHOLDER.fullmatch(ph), macs.get(ph)
            if m is None or mac is None:
                continue
            entity = m.group(1)
            try:
                value = unseal(self.aead, sealed, f"{key}|{entity}|{mac}".encode()).decode()
            except (InvalidTag, ValueError):
                continue  # tampered or foreign entry: never restore it
            if hmac.compare_digest(self._mac(key, entity, value), mac):
                out[ph] = value
        return out

    async def close(self) -> None:
        await self.redis.aclose()
