"""A pool of detector processes, so masking a large body never stalls the event loop.

Each worker is ``python -m vllm_guard.masking.worker CONFIG`` (no vLLM import, lower CPU
priority). A request takes an idle worker, sends its texts and waits in a thread (blocking
pipe I/O releases the GIL). A worker that dies, errs or times out is replaced and the request
is refused (fail closed), except when the worker exited without a reply (killed, crashed):
then the request is tried once more on a fresh worker, so one dead worker fails no request.
``workers=0`` detects in a thread of this process instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from vllm_guard.errors import GuardError
from vllm_guard.log import get_logger
from vllm_guard.masking.types import Detector, Span
from vllm_guard.masking.worker import Analysis, ValueLimit, analyse, encode, read_frame

logger = get_logger(__name__)


class DetectionFailed(GuardError):
    """No verdict from the detector: the request is refused, never forwarded."""


class WorkerExited(DetectionFailed):
    """The worker process was gone before it replied (its pipe closed)."""


class _Worker:
    def __init__(self, config_path: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "vllm_guard.masking.worker",
                                      config_path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self.ready = False

    def call(self, payload: bytes) -> dict:
        assert self.proc.stdin and self.proc.stdout
        if not self.ready:
            hello = read_frame(self.proc.stdout)
            if hello is None:
                raise WorkerExited("detector worker exited before it was ready")
            if not isinstance(hello, dict) or not hello.get("ready"):
                error = hello.get("error", "?") if isinstance(hello, dict) else "?"
                raise DetectionFailed(f"detector worker failed to start: {error}")
            self.ready = True
        try:
            self.proc.stdin.write(payload)
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerExited("detector worker exited") from None
        reply = read_frame(self.proc.stdout)
        if reply is None:
            raise WorkerExited("detector worker exited before it replied")
        if not isinstance(reply, dict) or ("results" not in reply and "too_many" not in reply):
            raise DetectionFailed(f"detector worker failed: {(reply or {}).get('error', 'exited')}")
        return reply

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class DetectorPool:
    def __init__(self, detector_factory, config_path: str | None, workers: int,
                 timeout_s: float):
        self.workers, self.timeout_s = workers, timeout_s
        self.config_path = config_path
        if workers == 0:
            self._detector: Detector = detector_factory()
            self._lock = threading.Lock()
            return
        if config_path is None:
            raise GuardError("detector workers need the masking config file's path")
        # started now, so spaCy loads while vLLM loads the model
        self._idle = [_Worker(config_path) for _ in range(workers)]
        self._free: asyncio.Semaphore | None = None
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="vllm-guard-detect")

    def _spawn(self) -> _Worker:
        try:
            return _Worker(self.config_path)  # type: ignore[arg-type]
        except OSError as e:  # the detail is for the log, not for the client
            logger.error("vllm-guard masking: detector worker could not start (%s)", e)
            raise DetectionFailed("sensitive-value detection failed") from None

    def _detect_inline(self, texts, rewrite, known, limit) -> list[Analysis]:
        with self._lock:
            return analyse(self._detector, texts, rewrite, known, limit=limit)

    async def analyse(self, texts: list[str], rewrite: list[bool],
                      known: list[tuple[str, str]],
                      limit: int | None = None) -> list[Analysis]:
        """Raises :class:`ValueLimit` as soon as more than ``limit`` new values are found."""
        if not texts:
            return []
        if self.workers == 0:
            return await asyncio.to_thread(self._detect_inline, texts, rewrite, known, limit)
        if self._free is None:
            self._free = asyncio.Semaphore(self.workers)
        payload = encode({"texts": texts, "rewrite": rewrite, "known": known, "limit": limit})
        async with self._free:
            try:
                reply = await self._call(payload)
            except WorkerExited as e:
                # killed or crashed before replying: once more on its fresh replacement (a
                # body that kills every worker is still refused, after the second)
                logger.warning("vllm-guard masking: %s; trying once more on a fresh one", e)
                try:
                    reply = await self._call(payload)
                except WorkerExited:
                    raise DetectionFailed("sensitive-value detection failed") from None
        if "too_many" in reply:
            raise ValueLimit(int(reply["too_many"]))
        return [Analysis(r["text"], [Span(s, e, ent, 1.0) for s, e, ent in r["spans"]])
                for r in reply["results"]]

    async def _call(self, payload: bytes) -> dict:
        """One worker's reply; the worker goes back to the pool only after a reply read in
        full. Raises :class:`WorkerExited` or :class:`DetectionFailed`."""
        worker = self._idle.pop() if self._idle else self._spawn()
        loop = asyncio.get_running_loop()
        answered = False
        try:
            reply = await asyncio.wait_for(
                loop.run_in_executor(self._threads, worker.call, payload), self.timeout_s)
            answered = True
            return reply
        except WorkerExited:
            raise
        except (DetectionFailed, OSError, asyncio.TimeoutError, ValueError, MemoryError) as e:
            logger.error("vllm-guard masking: detector worker replaced (%s)",
                         type(e).__name__ if not isinstance(e, DetectionFailed) else e)
            raise DetectionFailed("sensitive-value detection failed") from None
        finally:
            # Anything but a reply read in full (an error, a timeout, this task cancelled)
            # leaves the worker's pipes mid-frame: the next request would read this one's
            # reply. Kill it (which also unblocks the thread); a fresh one takes its slot.
            if answered:
                self._idle.append(worker)
            else:
                logger.warning("vllm-guard masking: detector worker replaced (its reply "
                               "was not read in full)")
                worker.kill()
                with contextlib.suppress(DetectionFailed):  # else the slot's next request
                    self._idle.append(self._spawn())  # tries again

    def close(self) -> None:
        if self.workers:
            for w in self._idle:
                w.kill()
            self._threads.shutdown(wait=False)
