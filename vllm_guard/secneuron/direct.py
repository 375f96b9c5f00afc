"""One copy: weight shards read straight into the memory the model computes with.

Each shard's header is read once into private memory and parsed; the tensors vLLM places
with a plain copy (:mod:`vllm_guard.loader.placement` finds where) are then read from the
file directly into their destination (positional reads, no page-cache mapping), and every
16 MiB block is hashed (BLAKE3) from the bytes just read there, on pool threads, against the
signed manifest. Bytes of tensors with no destination are read into a per-thread scratch
only to be hashed. Nothing is used before every block is checked: the caller decrypts,
scans and serves only after :func:`read_in_place` returned, and a mismatch raises (the load
is refused and the model never runs).
"""

from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import numpy as np
import torch

from vllm_guard.errors import ManifestError
from vllm_guard.secneuron.checkpoint import TensorEntry, private_buffer, safetensors_layout
from vllm_guard.secneuron.crypto import digest_equal, read_block
from vllm_guard.secneuron.files import IntegrityError, pool_workers
from vllm_guard.secneuron.manifest import FileDigest
from vllm_guard.secneuron.threads import loader_pool

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclass
class Shard:
    """One weight file, open, with its header bytes read (and later hashed) once."""

    name: str
    fd: int
    size: int
    head: np.ndarray  # bytes [0, len(head)) of the file
    entries: list[TensorEntry] = field(default_factory=list)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_shard(root: str | os.PathLike[str], name: str, expected: FileDigest) -> Shard:
    """Open ``name`` and parse its header; the size must be the signed one."""
    path = Path(root) / name
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != expected.size:
            raise IntegrityError(f"file {name} is {size} bytes, the signed manifest says "
                                 f"{expected.size}: modified after signing")
        first = np.zeros(8, np.uint8)
        read_block(fd, memoryview(first), 0)
        n = int.from_bytes(first.tobytes(), "little")
        if size < 8 or n > min(size - 8, MAX_HEADER_BYTES):
            raise ManifestError(f"{path}: not a safetensors file (bad header length)")
        head = private_buffer(8 + n)
        if read_block(fd, memoryview(head), 0) != 8 + n:
            raise IntegrityError(f"file {name} shrank while it was read")
        entries, _ = safetensors_layout(torch.from_numpy(head), path, size=size)
        return Shard(name, fd, size, head, entries)
    except BaseException:
        os.close(fd)
        raise


_scratch = threading.local()


def _scratch_view(n: int) -> memoryview:
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < n:
        buf = _scratch.buf = np.empty(max(n, 1 << 20), np.uint8)
    return memoryview(buf)[:n]


class _Plan:
    """The file's byte ranges and where each goes: the header (already read), a destination
    tensor's memory, or nowhere (scratch, read only to be hashed)."""

    def __init__(self, shard: Shard, dest: dict[str, torch.Tensor]):
        self.shard = shard
        self.starts: list[int] = [0]
        self.ranges: list[tuple[int, int, memoryview | None, bool]] = [
            (0, len(shard.head), memoryview(shard.head), True)]
        pos = len(shard.head)
        for e in shard.entries:
            if e.start < pos:  # a byte read into two places would be checked in one only
                raise ManifestError(f"{shard.name}: tensor {e.name} overlaps another")
            if e.start > pos:  # padding between tensors: signed too
                self._add(pos, e.start, None)
            t = dest.get(e.name)
            self._add(e.start, e.end, None if t is None else
                      memoryview(t.view(torch.uint8).reshape(-1).numpy()))
            pos = max(pos, e.end)
        if pos < shard.size:
            self._add(pos, shard.size, None)

    def _add(self, start: int, end: int, target: memoryview | None) -> None:
        self.starts.append(start)
        self.ranges.append((start, end, target, False))

    def fill(self, lo: int, hi: int, hasher: blake3.blake3 | None) -> None:
        """Read bytes ``[lo, hi)`` into place, hashing them there (in file order)."""
        i = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi and i < len(self.ranges):
            start, end, target, filled = self.ranges[i]
            a, b = max(lo, start), min(hi, end)
            if a < b:
                if target is not None:
                    view = target[a - start:b - start]
                elif hasher is not None:
                    view = _scratch_view(b - a)
                else:
                    view = None  # nobody uses these bytes and nobody checks them
                if (view is not None and not filled
                        and read_block(self.shard.fd, view, a) != b - a):
                    raise IntegrityError(f"file {self.shard.name} shrank while it was "
                                             "read: modified after signing")
                if hasher is not None and view is not None:
                    hasher.update(view)
            lo = max(lo, b)
            i += 1


def read_in_place(shards: list[Shard], expected: dict[str, FileDigest],
                  dest: dict[str, torch.Tensor], workers: int | None, verify: bool) -> int:
    """Read every shard's tensors into ``dest`` (name -> contiguous tensor of the entry's
    dtype and shape) and, with ``verify``, check every block of every shard against its
    signed BLAKE3. Returns the bytes verified. Raises IntegrityError on any mismatch."""
    for shard in shards:
        for e in shard.entries:
            t = dest.get(e.name)
            if t is not None and (t.dtype != e.dtype or list(t.shape) != e.shape
                                  or not t.is_contiguous() or t.device.type != "cpu"):
                raise ManifestError(f"tensor {e.name}: the model's place for it is "
                                    f"{t.dtype}{list(t.shape)}, the file holds "
                                    f"{e.dtype}{e.shape}")
    jobs = []
    for shard in shards:
        plan = _Plan(shard, dest)
        digest = expected[shard.name]
        if verify and not digest.blocks:
            raise ManifestError(f"file {shard.name} has no block digests")
        bb = digest.block_bytes if digest.blocks else max(shard.size, 1)
        jobs += [(plan, digest, i, bb) for i in range(-(-shard.size // bb))]

    def run(job: tuple[_Plan, FileDigest, int, int]) -> None:
        plan, digest, i, bb = job
        hasher = blake3.blake3(max_threads=1) if verify else None
        plan.fill(i * bb, min((i + 1) * bb, plan.shard.size), hasher)
        if hasher is not None:
            got = hasher.hexdigest()
            if not digest_equal(got, digest.blocks[i]):
                raise IntegrityError(
                    f"file {plan.shard.name} does not match its signed SHA-256 / BLAKE3 "
                    f"(block {i} of {len(digest.blocks)}: blake3 {got[:16]}..., signed "
                    f"{digest.blocks[i][:16]}...): modified after signing")

    with loader_pool(pool_workers(max(len(jobs), 1), workers)) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return sum(s.size for s in shards) if verify else 0
