"""An ASGI middleware that delays every HTTP request: an injected regression for the tests
of the benchmark's ``--check`` (passed to vLLM with ``--middleware``, never in the product)."""

from __future__ import annotations

import asyncio
import os

DELAY_ENV = "GUARD_TEST_DELAY_MS"


class DelayMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0) / 1000

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") == "http" and scope.get("method") == "POST":
            await asyncio.sleep(self.delay)
        await self.app(scope, receive, send)
