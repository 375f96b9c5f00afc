"""The vault's shared semantics in memory: expiry, atomicity, caps, isolation. The same tests
run against a real redis-server in tests/server/test_redis_vault.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable

import pytest

from vllm_guard.masking.vault import (
    InMemoryVault,
    Vault,
    VaultFull,
)

KEY = os.urandom(32)
EMAIL = "EMAIL_ADDRESS"
PERSON = "PERSON"
OLD, NEW = "old.secret@corp.example", "new.secret@corp.example"


def ns(name: str) -> str:
    """An opaque namespace, as the middleware derives it (a hex digest)."""
    return hashlib.sha256(f"test|{name}|{time.time_ns()}".encode()).hexdigest()


@pytest.fixture
def make() -> Callable[..., Vault]:
    """Factory (call it inside the event loop: a Redis client binds to it)."""
    return lambda **kw: InMemoryVault(**kw)


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


