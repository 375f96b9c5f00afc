"""A locked checkpoint against its signed manifest: file set, digests of every file, version.

The manifest signs the SHA-256 and size of every file in the checkpoint directory (weights,
``config.json``, tokenizer files, generation config, chat template, ...) and the BLAKE3 of
each 16 MiB block of every weight shard. Weight shards are read into private memory and
hashed block by block in the same pass on loader-pool threads (free of vLLM's core pinning;
BLAKE3 and file reads release the GIL), while the consumer copies the tensors of the blocks
already checked; no tensor is handed out before every block it lies in matched its signed
digest, so no unverified byte reaches a model.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vllm_guard.errors import ManifestError
from vllm_guard.secneuron.checkpoint import (
    Checkpoint,
    TensorEntry,
    private_buffer,
    safetensors_layout,
)
from vllm_guard.secneuron.crypto import block_digest, digest_equal, read_block, read_hashed
from vllm_guard.secneuron.files import (
    FileCheck,
    IntegrityError,
    check_digest,
    checkpoint_files,
    digest_files,
    pool_workers,
    side_files,
    weight_files,
)
from vllm_guard.secneuron.manifest import FileDigest, Manifest
from vllm_guard.secneuron.threads import loader_pool

# Shards read ahead of the consumer are held in memory: bound their bytes (one file at least).
DEFAULT_INFLIGHT_BYTES = 8 << 30


def read_verified(root: str | os.PathLike[str], name: str, expected: FileDigest) -> np.ndarray:
    """The file's bytes, read and hashed in one pass, checked before they are returned."""
    buf, sha = read_hashed(Path(root) / name)
    check_digest(name, expected, sha, len(buf))
    return buf


def read_side_files(root: str | os.PathLike[str], manifest: Manifest) -> dict[str, bytes]:
    """Every non-weight file's verified bytes (small: config, tokenizer, templates)."""
    return {n: read_verified(root, n, manifest.files[n]).tobytes() for n in side_files(manifest)}


class VerifiedFile:
    """One file read into private memory block by block, each block hashed by a pool thread
    and checked against its signed digest before :meth:`wait` lets anyone use its bytes."""

    def __init__(self, root: str | os.PathLike[str], name: str, expected: FileDigest,
                 pool: ThreadPoolExecutor):
        self.name, self.expected = name, expected
        self.path = Path(root) / name
        # hand-made digests without blocks: the whole file is one block, its SHA-256 signed
        self._signed = expected.blocks or (expected.sha256,)
        self._alg = "blake3" if expected.blocks else "sha256"
        self._block_bytes = expected.block_bytes if expected.blocks else max(expected.size, 1)
        self._fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        if size != expected.size:
            os.close(self._fd)
            raise IntegrityError(f"file {name} is {size} bytes, the signed manifest says "
                                 f"{expected.size}: modified after signing")
        self.buf = private_buffer(size)
        self._waited = 0
        # _blocks is assigned after every submit: pool threads must not read it
        self._blocks = [pool.submit(self._check_block, i) for i in range(len(self._signed))]

    def _check_block(self, i: int) -> None:
        bb = self._block_bytes
        view = memoryview(self.buf)[i * bb:(i + 1) * bb]
        n = read_block(self._fd, view, i * bb)
        # both release the GIL: blocks hash in parallel on the pool's threads
        got = (block_digest(view[:n]) if self._alg == "blake3"
               else hashlib.sha256(view[:n]).hexdigest())
        if n != len(view) or not digest_equal(got, self._signed[i]):
            # "signed SHA-256 / BLAKE3": the manifest signs both; the block's BLAKE3 failed
            what = "SHA-256 / BLAKE3" if self._alg == "blake3" else "SHA-256"
            raise IntegrityError(
                f"file {self.name} does not match its signed {what} (block {i} of "
                f"{len(self._signed)}: {self._alg} {got[:16]}..., signed "
                f"{self._signed[i][:16]}...): modified after signing")

    def wait(self, end: int) -> None:
        """Return once bytes ``[0, end)`` are verified; raise IntegrityError if any is not."""
        last = min(len(self._blocks), -(-end // self._block_bytes))
        try:
            while self._waited < last:
                self._blocks[self._waited].result()
                self._waited += 1
        except BaseException:
            self.close()
            raise
        if self._waited == len(self._blocks):
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            for f in self._blocks:
                f.cancel()
            for f in self._blocks:
                if not f.cancelled():
                    f.exception()  # reads in flight finish before the fd goes
            os.close(self._fd)
            self._fd = -1


def _verified_files(root: str | os.PathLike[str], expected: Mapping[str, FileDigest],
                    names: list[str], workers: int | None, inflight_bytes: int
                    ) -> Iterator[tuple[VerifiedFile, list[TensorEntry], dict[str, str]]]:
    """Each file in order with its parsed (verified) header; the files after it are opened
    ahead while their bytes fit ``inflight_bytes`` (one at least)."""
    pool = loader_pool(pool_workers(max(len(names), 2), workers))
    opened: deque[VerifiedFile] = deque()
    try:
        queue, held = iter(names), 0
        nxt = next(queue, None)
        while nxt is not None or opened:
            while nxt is not None and (not opened or held + expected[nxt].size
                                       <= inflight_bytes):
                opened.append(VerifiedFile(root, nxt, expected[nxt], pool))
                held += expected[nxt].size
                nxt = next(queue, None)
            vf = opened[0]
            entries, metadata = safetensors_layout(torch.from_numpy(vf.buf), vf.path, vf.wait)
            yield vf, entries, metadata
            vf.wait(vf.expected.size)  # bytes no tensor names are signed too
            opened.popleft()
            held -= vf.expected.size
    finally:
        for vf in opened:
            vf.close()
        pool.shutdown(wait=True, cancel_futures=True)


def iter_verified_tensors(
    root: str | os.PathLike[str],
    expected: Mapping[str, FileDigest],
    names: Iterable[str] | None = None,
    workers: int | None = None,
    inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield (file, tensor name, tensor) in file order, each tensor as soon as the blocks it
    lies in are verified, while pool threads read and hash the blocks after it. Tensors are
    views of the verified private buffer, writable in place (decryption)."""
    names = list(expected if names is None else names)
    for vf, entries, _ in _verified_files(root, expected, names, workers, inflight_bytes):
        buf = torch.from_numpy(vf.buf)
        for entry in entries:
            vf.wait(entry.end)
            yield vf.name, entry.name, entry.tensor(buf)


def iter_verified_safetensors(
    root: str | os.PathLike[str],
    expected: Mapping[str, FileDigest],
    names: Iterable[str] | None = None,
    workers: int | None = None,
    inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
) -> Iterator[tuple[str, dict[str, torch.Tensor], dict[str, str]]]:
    """Yield (file, tensors, metadata) per safetensors file, in order, each verified whole."""
    names = list(expected if names is None else names)
    for vf, entries, metadata in _verified_files(root, expected, names, workers,
                                                 inflight_bytes):
        vf.wait(vf.expected.size)
        buf = torch.from_numpy(vf.buf)
        yield vf.name, {e.name: e.tensor(buf) for e in entries}, metadata


def load_verified_checkpoint(root: str | os.PathLike[str], manifest: Manifest,
                             workers: int | None = None) -> Checkpoint:
    """:func:`~vllm_guard.secneuron.checkpoint.load_checkpoint`, every shard hash-checked."""
    ckpt = Checkpoint(Path(root), {}, {})
    for name, tensors, metadata in iter_verified_safetensors(
            root, manifest.files, weight_files(manifest), workers):
        ckpt.metadata[name] = metadata
        ckpt.tensors.update(tensors)
        ckpt.files.update(dict.fromkeys(tensors, name))
    if not ckpt.files:
        raise ManifestError(f"no *.safetensors files in {root}")
    return ckpt


def file_report(root: str | os.PathLike[str], manifest: Manifest | None,
                workers: int | None = None) -> list[FileCheck]:
    """Signed digest, on-disk digest and status of every signed or present file."""
    present = checkpoint_files(root)
    actual = digest_files(root, [n for n in present if (Path(root) / n).is_file()], workers)
    signed = manifest.files if manifest is not None else {}
    return [FileCheck(n, signed.get(n), actual.get(n)) for n in sorted(set(present) | set(signed))]
