"""The detector pool's worker processes: a reply belongs to the request that asked for it.

A request whose task is cancelled while its worker is busy (client gone, server shutting down,
an outer timeout) must not hand that worker to the next request: the next request would share
its pipes with the unread reply, which holds the first request's text and values.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.detector import build_detector
from vllm_guard.masking.pool import DetectorPool

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
