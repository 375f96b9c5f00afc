"""Tiers by directory, shared fixtures, and the pool of real vLLM servers.

- ``tests/unit``: in process; no vLLM server, no training, no redis-server (plain ``pytest``).
- ``tests/server``: real vLLM servers and a real redis-server on loopback.
- ``tests/pipelines``: training, efficacy, re-learning, DP, the benchmark gate, the demo build.

Each test gets its tier's marker and xdist group from its directory, so none can forget it.
Servers come from one session pool keyed by configuration: each starts once per run and
stops after the last test that uses it; the run ends with a count of every start.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from harness.fixtures import fixture_model
from harness.redis_server import RedisNotInstalled, RedisServer
from harness.server import LEDGER_ENV, ServerPool, VllmServer, post, read_ledger
from tests.servers import POOLED

pytest_plugins = ["tests.servers"]

ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = ROOT / ".cache" / "test-logs"
TIERS = ("unit", "server", "pipelines")

# --- tiers -------------------------------------------------------------------------------


def tier_of(path: Path) -> str:
    rel = path.resolve().relative_to(Path(__file__).resolve().parent)
    if len(rel.parts) < 2 or rel.parts[0] not in TIERS:
        raise pytest.UsageError(f"tests/{rel}: a test lives in tests/unit, tests/server or "
                                "tests/pipelines")
    return rel.parts[0]


# Pipelines that share cached models run in one worker, one after the other.
SHARED_MODELS = {"test_efficacy": "efficacy", "test_relearn": "efficacy"}


def xdist_group(tier: str, path: Path) -> str | None:
    """The server tier is one group (its servers are shared); each pipeline module is one
    (its models and servers are module-wide), the efficacy suites one together."""
    if tier == "server":
        return "server"
    if tier == "pipelines":
        return f"pipelines-{SHARED_MODELS.get(path.stem, path.stem)}"
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        tier = tier_of(path)
        item.add_marker(getattr(pytest.mark, tier))
        group = xdist_group(tier, path)
        if group and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: count only what runs
def pytest_collection_finish(session: pytest.Session) -> None:
    _users.clear()
    for item in session.items:
        for name in pooled_names(item):
            _users[name] += 1


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        # Workers share the cores: one thread each. A second torch thread waits at every
        # barrier for a core another process holds (training measured 4x slower).
        os.environ["OMP_NUM_THREADS"] = "1"  # and every subprocess a test starts
        import torch

        torch.set_num_threads(1)
    else:  # the controller (or a run without xdist)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        ledger = LOG_DIR / f"servers-{os.getpid()}.jsonl"
        ledger.unlink(missing_ok=True)
        os.environ[LEDGER_ENV] = str(ledger)  # inherited by workers, benchmarks, servers


# --- where the run's time goes: per worker and per xdist group ----------------------------

_started = time.monotonic()
_busy: Counter[str] = Counter()  # worker -> seconds in setup/call/teardown
_done_at: dict[str, float] = {}  # worker -> seconds since start of its last report
_group_busy: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    node = getattr(report, "node", None)  # set by xdist on the controller
    if node is None:
        return
    worker = node.gateway.id
    _busy[worker] += report.duration
    _done_at[worker] = time.monotonic() - _started
    group = report.nodeid.rpartition("@")[2] if "@" in report.nodeid else "(ungrouped)"
    _group_busy[group] += report.duration


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if _busy:
        terminalreporter.section("time per worker and group")
        for worker in sorted(_busy):
            terminalreporter.write_line(f"{worker}: busy {_busy[worker]:.0f} s, last test done "
                                        f"{_done_at[worker]:.0f} s after the start")
        for group, seconds in _group_busy.most_common():
            terminalreporter.write_line(f"  {group}: {seconds:.0f} s")
    ledger = os.environ.get(LEDGER_ENV)
    if hasattr(config, "workerinput") or not ledger:
        return
    starts = read_ledger(Path(ledger))
    if not starts:
        return
    total = sum(s["seconds"] for s in starts)
    terminalreporter.section("vLLM servers")
    terminalreporter.write_line(f"vLLM server starts: {len(starts)}, {total:.0f} s until ready "
                                "or refused in all")
    for s in starts:
        terminalreporter.write_line(f"  {s['name']}: {s['outcome']} after {s['seconds']} s")


# --- the server pool ---------------------------------------------------------------------

_users: Counter[str] = Counter()
_pool: ServerPool | None = None


@pytest.fixture(scope="session")
def server_pool():
    global _pool
    _pool = ServerPool(LOG_DIR)
    yield _pool
    _pool.close()
    _pool = None


def pooled_names(item: pytest.Item) -> set[str]:
    """Pooled servers a test uses: as fixtures, or as the parameter of a fixture that asks
    for the one it names (``params=["grants_eager", "grants_compiled"]``)."""
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        names |= {v for v in callspec.params.values() if isinstance(v, str)}
    return POOLED & names


def pytest_runtest_teardown(item: pytest.Item) -> None:
    for name in pooled_names(item):
        _users[name] -= 1
        if _users[name] <= 0 and _pool is not None:
            _pool.release(name)


# --- models, keys, redis -----------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The trained tiny fixture (built once per cache, a few seconds of training)."""
    return fixture_model("tiny")


@pytest.fixture(scope="session")
def random_tiny() -> Path:
    """The tiny fixture's shape with random weights: no training (unit tier)."""
    return fixture_model("tiny-random")


@pytest.fixture(scope="module")
def keydir(tmp_path_factory) -> Path:
    """Task keys for add, capital and reverse, and a publisher signing key."""
    from vllm_guard.secneuron.keys import KeyDir

    return KeyDir.create(tmp_path_factory.mktemp("keys"), ("add", "capital", "reverse")).root


class Redis(RedisServer):
    def start(self) -> Redis:
        try:
            return super().start()
        except RedisNotInstalled as e:
            pytest.fail(str(e))


@pytest.fixture(scope="session")
def redis_server():
    r = Redis().start()
    yield r
    r.stop()


# --- small clients -----------------------------------------------------------------------


def stream(url: str, body: dict, timeout: float = 120,
           headers: dict[str, str] | None = None) -> list[dict]:
    """POST with stream=true; return the parsed SSE data events (without [DONE])."""
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json", **(headers or {})})
    events, done = [], False
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert done, "stream ended without data: [DONE]"
    return events


def complete(server: VllmServer, prompt: str, max_tokens: int = 8,
             headers: dict[str, str] | None = None) -> str:
    status, body = post(server.url + "/v1/completions",
                        {"model": "test", "prompt": prompt, "max_tokens": max_tokens,
                         "temperature": 0}, headers)
    assert status == 200, body
    return body["choices"][0]["text"]
