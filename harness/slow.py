"""An ASGI middleware that delays every POST: an injected regression for the tests of the
benchmark's ``--check`` (passed to vLLM with ``--middleware``, never in the product).

The delay in milliseconds is read from the file ``$GUARD_TEST_DELAY_FILE`` at each request,
so one running server serves the run without a delay and the run with one.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

DELAY_FILE_ENV = "GUARD_TEST_DELAY_FILE"


class DelayMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        self.file = Path(os.environ.get(DELAY_FILE_ENV, "/nonexistent"))

    def delay(self) -> float:
        try:
            return float(self.file.read_text().strip() or 0) / 1000
        except (OSError, ValueError):
            return 0.0

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") == "http" and scope.get("method") == "POST":
            await asyncio.sleep(self.delay())
        await self.app(scope, receive, send)
