"""The vault against a real redis-server (and in memory): expiry, atomicity, caps, isolation,
no plaintext at rest, tampering, and failing closed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable

import pytest

from vllm_guard.masking.vault import (
    InMemoryVault,
    RedisVault,
    Vault,
    VaultFull,
    VaultUnavailable,
)

KEY = os.urandom(32)
EMAIL = "EMAIL_ADDRESS"
PERSON = "PERSON"
OLD, NEW = "old.secret@corp.example", "new.secret@corp.example"


def ns(name: str) -> str:
    """An opaque namespace, as the middleware derives it (a hex digest)."""
    return hashlib.sha256(f"test|{name}|{time.time_ns()}".encode()).hexdigest()


@pytest.fixture(params=["memory", "redis"])
def make(request) -> Callable[..., Vault]:
    """Factory (call it inside the event loop: the Redis client binds to it)."""
    if request.param == "memory":
        return lambda **kw: InMemoryVault(**kw)
    server = request.getfixturevalue("redis_server")
    server.client().flushdb()
    return lambda **kw: RedisVault(server.url, KEY, **kw)


def session_keys(server) -> list[bytes]:
    return list(server.client().scan_iter("vg:*"))


def dump(server) -> bytes:
    """Every key name, hash field and value in Redis, concatenated."""
    client, out = server.client(), []
    for k in client.scan_iter("*"):
        out.append(k)
        assert client.type(k) == b"hash", k
        for f, v in client.hgetall(k).items():
            out += [f, v]
    return b"\n".join(out)


# --- shared semantics (both vaults) -----------------------------------------------------------


def test_placeholders_consistent_within_batch_and_across_calls(make):
    async def go():
        v = make(ttl_seconds=60)
        n = ns("a")
        got = await v.assign_many(n, [(EMAIL, OLD), (PERSON, "Ann Lee"), (EMAIL, NEW),
                                      (EMAIL, OLD)])
        assert got == ["<EMAIL_ADDRESS_1>", "<PERSON_1>", "<EMAIL_ADDRESS_2>",
                       "<EMAIL_ADDRESS_1>"]
        # positional, as tests/test_masking.py calls it
        assert await v.assign(n, EMAIL, NEW) == "<EMAIL_ADDRESS_2>"
        assert await v.assign(n, PERSON, "Bo Chan") == "<PERSON_2>"
        # same text, other entity: another placeholder
        assert await v.assign(n, PERSON, OLD) == "<PERSON_3>"
        assert await v.assign_many(n, []) == []
        assert await v.mapping(n) == {"<EMAIL_ADDRESS_1>": OLD, "<EMAIL_ADDRESS_2>": NEW,
                                      "<PERSON_1>": "Ann Lee", "<PERSON_2>": "Bo Chan",
                                      "<PERSON_3>": OLD}
        await v.close()

    asyncio.run(go())


def test_expired_session_restarts_and_never_restores_old_value(make, request):
    async def go():
        v = make(ttl_seconds=1)
        n = ns("reused")
        assert await v.assign(n, EMAIL, OLD) == "<EMAIL_ADDRESS_1>"
        assert await v.mapping(n) == {"<EMAIL_ADDRESS_1>": OLD}
        await asyncio.sleep(2.2)
        if "redis_server" in request.fixturenames:
            assert session_keys(request.getfixturevalue("redis_server")) == []
        assert await v.mapping(n) == {}
        assert await v.assign(n, EMAIL, NEW) == "<EMAIL_ADDRESS_1>"
        assert await v.mapping(n) == {"<EMAIL_ADDRESS_1>": NEW}
        await v.close()

    asyncio.run(go())


def test_reading_refreshes_ttl(make):
    async def go():
        v = make(ttl_seconds=2)
        n = ns("busy")
        await v.assign(n, EMAIL, OLD)
        await asyncio.sleep(1.3)
        assert await v.mapping(n) == {"<EMAIL_ADDRESS_1>": OLD}
        await asyncio.sleep(1.3)  # 2.6 s after the write, 1.3 s after the read
        assert await v.mapping(n) == {"<EMAIL_ADDRESS_1>": OLD}
        await v.close()

    asyncio.run(go())


def test_concurrent_assign_many_one_placeholder_per_value(make, request):
    values = [(EMAIL if i % 2 else PERSON, f"value-{i}@corp.example") for i in range(9)]
    batches = [[values[i % 9], values[(i + 1) % 9], values[(i * 4) % 9], values[i % 9]]
               for i in range(20)]

    async def go():
        vaults = [make(ttl_seconds=60)]
        if "redis_server" in request.fixturenames:
            vaults.append(make(ttl_seconds=60))  # a second replica on the same Redis
        n = ns("race")
        results = await asyncio.gather(*(vaults[i % len(vaults)].assign_many(n, b)
                                         for i, b in enumerate(batches)))
        seen: dict[tuple[str, str], set[str]] = {}
        for batch, got in zip(batches, results, strict=True):
            assert len(got) == len(batch)
            for item, ph in zip(batch, got, strict=True):
                assert ph.startswith(f"<{item[0]}_")
                seen.setdefault(item, set()).add(ph)
        assert all(len(p) == 1 for p in seen.values()), seen
        phs = [next(iter(p)) for p in seen.values()]
        assert len(set(phs)) == len(phs) == 9
        # numbers are dense per entity: no number was burnt by a lost race
        for entity in (EMAIL, PERSON):
            nums = sorted(int(p[len(entity) + 2:-1]) for p in phs if p.startswith(f"<{entity}_"))
            assert nums == list(range(1, len(nums) + 1))
        expected = {next(iter(p)): value for (_, value), p in seen.items()}
        for v in vaults:
            assert await v.mapping(n) == expected
            await v.close()

    asyncio.run(go())


def test_cap_raises_vault_full_and_writes_nothing(make, request):
    server = request.getfixturevalue("redis_server") if "redis_server" in \
        request.fixturenames else None

    async def go():
        v = make(ttl_seconds=60, max_entries=3)
        n = ns("full")
        # a first request over the cap leaves nothing behind
        with pytest.raises(VaultFull):
            await v.assign_many(n, [(EMAIL, f"{i}@x.example") for i in range(4)])
        assert await v.mapping(n) == {}
        if server:
            assert session_keys(server) == []
        assert await v.assign_many(n, [(EMAIL, OLD), (PERSON, "Ann Lee"), (EMAIL, OLD)]) == [
            "<EMAIL_ADDRESS_1>", "<PERSON_1>", "<EMAIL_ADDRESS_1>"]
        before = await v.mapping(n)
        raw = server.client().hgetall(session_keys(server)[0]) if server else None
        # one known + two new = 4 placeholders > 3
        with pytest.raises(VaultFull):
            await v.assign_many(n, [(EMAIL, OLD), (EMAIL, NEW), (PERSON, "Bo Chan")])
        assert await v.mapping(n) == before
        if server:
            assert server.client().hgetall(session_keys(server)[0]) == raw
        # known values still resolve; one more fits, numbered as if nothing happened
        assert await v.assign_many(n, [(EMAIL, OLD), (EMAIL, NEW), (EMAIL, NEW)]) == [
            "<EMAIL_ADDRESS_1>", "<EMAIL_ADDRESS_2>", "<EMAIL_ADDRESS_2>"]
        assert await v.assign(n, PERSON, "Ann Lee") == "<PERSON_1>"
        with pytest.raises(VaultFull):
            await v.assign(n, PERSON, "Bo Chan")
        assert await v.mapping(n) == {**before, "<EMAIL_ADDRESS_2>": NEW}
        await v.close()

    asyncio.run(go())


def test_namespaces_isolated(make):
    async def go():
        v = make(ttl_seconds=60)
        a, b = ns("alice"), ns("bob")
        assert await v.assign_many(a, [(EMAIL, OLD), (EMAIL, NEW)]) == [
            "<EMAIL_ADDRESS_1>", "<EMAIL_ADDRESS_2>"]
        assert await v.assign_many(b, [(EMAIL, NEW)]) == ["<EMAIL_ADDRESS_1>"]
        assert await v.mapping(a) == {"<EMAIL_ADDRESS_1>": OLD, "<EMAIL_ADDRESS_2>": NEW}
        assert await v.mapping(b) == {"<EMAIL_ADDRESS_1>": NEW}
        assert await v.mapping(ns("carol")) == {}
        await v.close()

    asyncio.run(go())


def test_in_memory_bounds_sessions_lru():
    async def go():
        v = InMemoryVault(ttl_seconds=60, max_sessions=2)
        a, b, c = ns("a"), ns("b"), ns("c")
        await v.assign(a, EMAIL, OLD)
        await v.assign(b, EMAIL, OLD)
        await v.mapping(a)  # a is now the most recently used
        await v.assign(c, EMAIL, OLD)
        assert await v.mapping(b) == {}
        assert await v.mapping(a) == {"<EMAIL_ADDRESS_1>": OLD}
        assert await v.mapping(c) == {"<EMAIL_ADDRESS_1>": OLD}

    asyncio.run(go())


def test_in_memory_sessions_are_not_evicted_by_requests_without_values():
    """Every anonymous request without a session id is a new namespace: if a request with
    nothing to mask created a session, a flood of them would evict everyone else's."""
    async def go():
        v = InMemoryVault(ttl_seconds=60, max_sessions=2)
        alice = ns("alice")
        await v.assign(alice, EMAIL, OLD)
        for i in range(5):
            assert await v.assign_many(ns(f"flood{i}"), []) == []
            assert await v.mapping(ns(f"flood{i}")) == {}
        assert await v.mapping(alice) == {"<EMAIL_ADDRESS_1>": OLD}

    asyncio.run(go())


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
