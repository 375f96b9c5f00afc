"""A real ``redis-server`` on loopback with no persistence, for tests and benchmarks.

No persistence on purpose: a restart loses every session, the harsh case for the vault.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from harness.server import free_port


class RedisNotInstalled(RuntimeError):
    pass


class RedisServer:
    def __init__(self, port: int | None = None, log: Path | None = None) -> None:
        self.port = port or free_port()
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or start again, on the same port) and wait until it answers."""
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisNotInstalled("redis-server is not installed (scripts/setup.sh installs it)")
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no"],
                                         stdout=out, stderr=subprocess.STDOUT)
        finally:
            if self.log:
                out.close()
        for _ in range(200):
            try:
                redis.Redis(port=self.port).ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self):  # noqa: ANN201 - redis.Redis, imported lazily
        import redis

        return redis.Redis(port=self.port)
