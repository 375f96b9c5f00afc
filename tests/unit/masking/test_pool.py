"""The detector pool's worker processes: a reply belongs to the request that asked for it.

A request whose task is cancelled while its worker is busy (client gone, server shutting down,
an outer timeout) must not hand that worker to the next request: the next request would share
its pipes with the unread reply, which holds the first request's text and values.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.detector import build_detector
from vllm_guard.masking.pool import DetectionFailed, DetectorPool

ALICE = "alice.private@example.com 078-05-1120 " * 20_000  # ~1 MB: the worker is busy a while
BOB = "bob@example.org"


@pytest.fixture()
def pool(tmp_path):
    path = tmp_path / "masking.json"
    path.write_text(json.dumps({"ner": "off", "name_lists": False}))
    config = MaskingConfig.load(str(path))
    # a replacement worker imports Presidio: > 60 s at a load of 10 on 2 cores
    p = DetectorPool(lambda: build_detector(config), str(path), 2, 180)
    yield p
    p.close()


def test_a_cancelled_request_never_shares_its_worker_with_the_next(pool):
    async def scenario() -> list[str]:
        await pool.analyse(["warm up"], [True], [])  # both workers started
        await pool.analyse(["warm up"], [True], [])
        texts = []
        for _ in range(2):
            alice = asyncio.create_task(pool.analyse([ALICE], [True], []))
            await asyncio.sleep(0.3)  # her text is in the worker
            alice.cancel()
            with pytest.raises(asyncio.CancelledError):
                await alice
            # generous: a replacement worker starts (imports Presidio) on a busy machine
            bob = await asyncio.wait_for(pool.analyse([BOB], [True], []), 180)
            texts.append(bob[0].text)
            assert [s.entity for s in bob[0].spans] == ["EMAIL_ADDRESS"]
        return texts

    assert asyncio.run(scenario()) == [BOB] * 2


# --- a body with far more values than a request may hold (issue #32 item 5) -----------------

MANY = " ".join(f"mail u{i}x@host{i}.org now" for i in range(50_000))  # 50,000 distinct


async def _loop_lag(stop: asyncio.Event) -> float:
    """The longest the event loop went without running this task (ticks every 5 ms)."""
    worst, loop = 0.0, asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.005)
        worst = max(worst, loop.time() - t - 0.005)
    return worst


def test_too_many_values_refused_early_and_the_event_loop_stays_free(tmp_path):
    """Refused with 413 after the cheap pattern count, not after full detection (10 s+),
    and the loop is never blocked for 50 ms meanwhile."""
    from vllm_guard.masking.masker import Masker, TooManyValues
    from vllm_guard.masking.vault import InMemoryVault

    path = tmp_path / "masking.json"
    path.write_text(json.dumps({"ner": "off", "name_lists": False}))
    pool = DetectorPool(None, str(path), 1, 300)  # one worker: it starts alone, sooner
    masker = Masker(pool, InMemoryVault(), max_per_request=1000)

    async def scenario() -> tuple[float, float]:
        await pool.analyse(["warm up"], [True], [])
        stop = asyncio.Event()
        lag = asyncio.create_task(_loop_lag(stop))
        t = time.monotonic()
        with pytest.raises(TooManyValues) as e:
            await masker.mask_request("ns", "/v1/completions", {"model": "m", "prompt": MANY})
        took = time.monotonic() - t
        stop.set()
        assert e.value.status == 413 and "more than the 1000 allowed" in e.value.message
        return took, await lag

    took, lag = asyncio.run(scenario())
    print(f"413 after {took:.2f} s, event loop blocked at most {lag * 1000:.0f} ms")
    assert took < 3.0 and lag < 0.05, (took, lag)
    try:  # the worker answered in full: it serves the next request
        ok = asyncio.run(pool.analyse(["a@b.org c@d.org"], [True], [], 2))
        assert len(ok[0].spans) == 2
    finally:
        pool.close()


def test_detection_stops_at_the_first_window_past_the_limit():
    """Values the pattern count cannot see (names) stop detection window by window."""
    from vllm_guard.masking.types import Detector, Span
    from vllm_guard.masking.worker import WINDOW, ValueLimit, analyse

    class Names(Detector):
        calls = 0

        def detect(self, text: str) -> list[Span]:
            Names.calls += 1
            return [Span(i, i + 6, "PERSON", 1.0) for i in range(0, len(text) - 6, 8)]

    text = "".join(f"N{i:05d}  " for i in range(60_000))  # 480,000 chars, 15 windows
    with pytest.raises(ValueLimit):
        analyse(Names(), [text], [True], [], limit=1000)
    assert Names.calls == 1
    Names.calls = 0
    assert len(analyse(Names(), [text[:WINDOW]], [True], [], limit=10_000)[0].spans) > 4000


# --- a detector worker that dies (killed, crashed) (issue #32 item 14, the soak) -------------

# The worker protocol (length-prefixed JSON frames) without Presidio, which takes 10-20 s to
# import per worker on a busy machine. The first worker to see "busy" takes its marker file
# and holds the request for a minute; the next one answers at once. "crash" kills any worker.
FAKE_WORKER = """
import json, os, struct, sys, time
FRAME = struct.Struct("!Q")
def send(doc):
    data = json.dumps(doc).encode()
    sys.stdout.buffer.write(FRAME.pack(len(data)) + data)
    sys.stdout.buffer.flush()
send({"ready": True})
while len(head := sys.stdin.buffer.read(FRAME.size)) == FRAME.size:
    req = json.loads(sys.stdin.buffer.read(FRAME.unpack(head)[0]))
    if req["texts"][0] == "crash":
        os._exit(1)
    if req["texts"][0] == "busy" and os.path.exists(sys.argv[1]):
        os.remove(sys.argv[1])
        time.sleep(60)
    send({"results": [{"text": t, "spans": [[0, len(t), "EMAIL_ADDRESS"]]}
                      for t in req["texts"]]})
"""


def test_a_dead_worker_is_replaced_without_failing_a_request(tmp_path, monkeypatch):
    """The soak killed one detector worker under load and the request it was serving got a
    503: detection is tried once more on a fresh worker when the worker exited without a
    reply (idle when it died, or mid-request). Nothing is forwarded unmasked either way."""
    import subprocess
    import sys

    from vllm_guard.masking import pool as pool_module

    script, marker = tmp_path / "fake_worker.py", tmp_path / "busy-once"
    script.write_text(FAKE_WORKER)
    marker.touch()

    def fake_init(self, config_path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(script), str(marker)],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self.ready = False

    monkeypatch.setattr(pool_module._Worker, "__init__", fake_init)
    pool = DetectorPool(None, "unused.json", 1, 30)  # one worker: the dead one is the only one

    async def scenario() -> tuple[list, list]:
        await pool.analyse(["warm up"], [True], [])
        pool._idle[0].kill()  # dies while idle: the next request must not pay for it
        first = await pool.analyse([BOB], [True], [])
        busy = pool._idle[0]
        task = asyncio.create_task(pool.analyse(["busy"], [True], []))
        while marker.exists():  # until the worker holds the request
            await asyncio.sleep(0.05)
        busy.proc.kill()  # dies mid-request
        second = await asyncio.wait_for(task, 20)  # the retry is answered at once
        assert pool._idle[0] is not busy
        # a body that kills every worker is tried twice, then refused (fail closed)
        with pytest.raises(DetectionFailed):
            await pool.analyse(["crash"], [True], [])
        assert (await pool.analyse([BOB], [True], []))[0].text == BOB  # and the pool serves on
        return first, second

    try:
        first, second = asyncio.run(scenario())
    finally:
        pool.close()
    assert [(a.text, [s.entity for s in a.spans]) for a in first] == [(BOB, ["EMAIL_ADDRESS"])]
    assert [a.text for a in second] == ["busy"]
