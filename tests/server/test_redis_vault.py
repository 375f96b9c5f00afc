"""The vault against a real redis-server: the shared semantics of the in-memory tests, then
one key per session, no plaintext at rest, tampering, and failing closed."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import pytest

from tests.conftest import Redis
from tests.unit.masking.test_vault import (  # noqa: F401  (collected here against Redis)
    EMAIL,
    KEY,
    NEW,
    OLD,
    PERSON,
    dump,
    ns,
    session_keys,
    test_cap_raises_vault_full_and_writes_nothing,
    test_concurrent_assign_many_one_placeholder_per_value,
    test_expired_session_restarts_and_never_restores_old_value,
    test_namespaces_isolated,
    test_placeholders_consistent_within_batch_and_across_calls,
    test_reading_refreshes_ttl,
)
from vllm_guard.masking.vault import RedisVault, VaultUnavailable


@pytest.fixture(scope="module")
def redis_server():
    """A redis-server of this module's own: it flushes and stops it."""
    r = Redis().start()
    yield r
    r.stop()


@pytest.fixture
def make(redis_server) -> Callable[..., RedisVault]:
    redis_server.client().flushdb()
    return lambda **kw: RedisVault(redis_server.url, KEY, **kw)


# --- Redis only -------------------------------------------------------------------------------


def test_redis_one_key_per_session_and_no_plaintext(redis_server):
    redis_server.client().flushdb()
    secrets = [OLD, NEW, "Ann Lee"]

    async def go():
        v = RedisVault(redis_server.url, KEY, 60)
        for name in ("a", "b"):
            await v.assign_many(ns(name), [(EMAIL, OLD), (EMAIL, NEW), (PERSON, "Ann Lee")])
        await v.close()

    asyncio.run(go())
    keys = session_keys(redis_server)
    assert len(keys) == 2
    for k in keys:
        assert 0 < redis_server.client().ttl(k) <= 60
    data = dump(redis_server)
    for s in secrets:
        for entity in (EMAIL, PERSON):
            for raw in (s, f"{entity}\x00{s}", f"{entity}|{s}"):
                assert hashlib.sha256(raw.encode()).hexdigest().encode() not in data
        for part in (s.encode(), s.split("@")[0].encode(), b"corp.example", b"Ann"):
            assert part not in data


def _one_key(redis_server) -> bytes:
    (key,) = session_keys(redis_server)
    return key


def test_redis_tampered_entries_are_not_restored(redis_server):
    redis_server.client().flushdb()
    client = redis_server.client()
    e1, e2 = b"p:<EMAIL_ADDRESS_1>", b"p:<EMAIL_ADDRESS_2>"

    async def go():
        v = RedisVault(redis_server.url, KEY, 60)
        n = ns("tamper")
        await v.assign_many(n, [(EMAIL, OLD), (EMAIL, NEW), (PERSON, "Ann Lee")])
        key = _one_key(redis_server)
        good = client.hgetall(key)

        # a flipped ciphertext byte: that entry only is dropped
        bad = bytearray(good[e1])
        bad[-1] ^= 1
        client.hset(key, e1, bytes(bad))
        assert await v.mapping(n) == {"<EMAIL_ADDRESS_2>": NEW, "<PERSON_1>": "Ann Lee"}

        # ciphertexts swapped between two placeholders: neither restored
        client.hset(key, mapping={e1: good[e2], e2: good[e1]})
        assert await v.mapping(n) == {"<PERSON_1>": "Ann Lee"}

        # an entry moved to another entity (value and MAC entries moved too): dropped
        client.delete(key)
        client.hset(key, mapping=good)
        mac_field = next(f for f, p in good.items() if p == b"<EMAIL_ADDRESS_1>")
        person_mac = next(f for f, p in good.items() if p == b"<PERSON_1>")
        client.hdel(key, e1, b"p:<PERSON_1>", person_mac)
        client.hset(key, mapping={b"p:<PERSON_1>": good[e1], mac_field: b"<PERSON_1>"})
        got = await v.mapping(n)
        assert OLD not in got.values() and "<PERSON_1>" not in got

        # the whole session copied under another namespace: nothing restored
        other = ns("other")
        await v.assign(other, EMAIL, "x@y.example")
        other_key = next(k for k in session_keys(redis_server) if k != key)
        client.delete(other_key)
        client.hset(other_key, mapping=good)
        assert await v.mapping(other) == {}
        await v.close()

    asyncio.run(go())


def test_redis_down_raises_vault_unavailable(redis_server):
    async def go():
        v = RedisVault(redis_server.url, KEY, 60)
        n = ns("down")
        await v.assign(n, EMAIL, OLD)
        redis_server.stop()
        try:
            with pytest.raises(VaultUnavailable):
                await v.assign_many(n, [(EMAIL, NEW)])
            with pytest.raises(VaultUnavailable):
                await v.mapping(n)
        finally:
            redis_server.start()
        await v.close()

    asyncio.run(go())


def test_redis_unreachable_raises_vault_unavailable():
    from harness.server import free_port

    async def go():
        v = RedisVault(f"redis://127.0.0.1:{free_port()}/0", KEY, 60)
        with pytest.raises(VaultUnavailable):
            await v.assign(ns("x"), EMAIL, OLD)
        with pytest.raises(VaultUnavailable):
            await v.mapping(ns("x"))
        await v.close()

    asyncio.run(go())
