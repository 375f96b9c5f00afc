"""Thread pools for reading, hashing and decrypting a checkpoint, free of vLLM's core pinning.

vLLM's CPU worker binds its threads to its compute cores (with 2 cores: core 0, core 1
reserved for the API server), and threads inherit the binding: every loader thread then
shares one core. The API server is idle while weights load, so loader threads may run on
every core the process is allowed; they end with the load.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor


def _unpin() -> None:
    # The kernel keeps only the CPUs the cgroup allows; failing that, the inherited binding.
    if hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, range(os.cpu_count() or 1))


def loader_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, each allowed on every CPU of the machine."""
    return ThreadPoolExecutor(workers, initializer=_unpin)
