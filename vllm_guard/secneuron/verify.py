"""A locked checkpoint against its signed manifest: file set, SHA-256 of every file, version.

The manifest signs the SHA-256 and size of every file in the checkpoint directory (weights,
``config.json``, tokenizer files, generation config, chat template, ...). Weight shards are
read into private memory and hashed block by block in the same pass, several files in
parallel threads (hashlib and file reads release the GIL); a shard is compared with its
signed hash before any tensor of it is used, so no unverified byte reaches a model.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vllm_guard.errors import ManifestError
from vllm_guard.secneuron.checkpoint import Checkpoint, checkpoint_files, parse_safetensors
from vllm_guard.secneuron.crypto import digest_equal, hash_file, read_hashed
from vllm_guard.secneuron.manifest import FileDigest, Manifest

WEIGHT_SUFFIX = ".safetensors"
# Shards read ahead of the consumer are held in memory: bound their bytes (one file at least).
DEFAULT_INFLIGHT_BYTES = 8 << 30


class IntegrityError(ManifestError):
    """A file of the checkpoint is missing, extra, or differs from its signed hash."""


class RollbackError(ManifestError):
    """The checkpoint's signed version is below the configured ``min_version``."""


@dataclass(frozen=True)
class FileCheck:
    """One row of :func:`file_report` (``vllm-guard inspect``)."""

    name: str
    signed: FileDigest | None
    actual: FileDigest | None

    @property
    def status(self) -> str:
        if self.signed is None:
            return "not signed"
        if self.actual is None:
            return "missing"
        same = self.actual.size == self.signed.size and digest_equal(self.actual.sha256,
                                                                     self.signed.sha256)
        return "ok" if same else "MISMATCH"


def is_weight_file(name: str) -> bool:
    """Top-level ``*.safetensors``: what the loader streams (everything else is a side file)."""
    return name.endswith(WEIGHT_SUFFIX) and "/" not in name


def weight_files(manifest: Manifest) -> list[str]:
    return sorted(n for n in manifest.files if is_weight_file(n))


def side_files(manifest: Manifest) -> list[str]:
    return sorted(n for n in manifest.files if not is_weight_file(n))


def _workers(n_items: int, workers: int | None) -> int:
    return max(1, min(n_items, workers or min(os.cpu_count() or 1, 8)))


def check_version(manifest: Manifest, min_version: int) -> None:
    if manifest.version < min_version:
        raise RollbackError(f"checkpoint version {manifest.version} is older than min_version "
                            f"{min_version}: refusing a rolled-back checkpoint")


def check_digest(name: str, expected: FileDigest, sha256: str, size: int) -> None:
    """Raise IntegrityError (one line, naming the file) unless size and hash match."""
    if size != expected.size or not digest_equal(sha256, expected.sha256):
        raise IntegrityError(
            f"file {name} does not match its signed SHA-256 (size {size}, signed "
            f"{expected.size}; sha256 {sha256[:16]}..., signed {expected.sha256[:16]}...): "
            "modified after signing")


def check_file_set(root: str | os.PathLike[str], manifest: Manifest) -> None:
    """Exactly the signed files: none missing, none added (vLLM reads files we can't name)."""
    present, signed = set(checkpoint_files(root)), set(manifest.files)
    missing, extra = sorted(signed - present), sorted(present - signed)
    if missing:
        raise IntegrityError(f"file {missing[0]} is signed in the manifest but missing from "
                             f"{root}")
    if extra:
        raise IntegrityError(f"file {extra[0]} in {root} is not covered by the signed manifest "
                             "(added after signing)")


def check_sizes(root: str | os.PathLike[str], manifest: Manifest, names: Iterable[str]) -> None:
    """The cheap part of a hash check (a stat), for files whose hashing is turned off."""
    for name in names:
        size = (Path(root) / name).stat().st_size
        if size != manifest.files[name].size:
            raise IntegrityError(f"file {name} is {size} bytes, the signed manifest says "
                                 f"{manifest.files[name].size}: modified after signing")


def digest_files(root: str | os.PathLike[str], names: Iterable[str],
                 workers: int | None = None) -> dict[str, FileDigest]:
    """SHA-256 and size of each file, streamed, several files in parallel."""
    names = list(names)
    with ThreadPoolExecutor(_workers(len(names), workers)) as pool:
        done = pool.map(lambda n: hash_file(Path(root) / n), names)
        return {n: FileDigest(sha, size) for n, (sha, size) in zip(names, done, strict=True)}


def verify_files(root: str | os.PathLike[str], manifest: Manifest, names: Iterable[str],
                 workers: int | None = None) -> int:
    """Hash the named files and check each against the manifest; returns the bytes checked."""
    got = digest_files(root, names, workers)
    for name, d in got.items():
        check_digest(name, manifest.files[name], d.sha256, d.size)
    return sum(d.size for d in got.values())


def read_verified(root: str | os.PathLike[str], name: str, expected: FileDigest) -> np.ndarray:
    """The file's bytes, read and hashed in one pass, checked before they are returned."""
    buf, sha = read_hashed(Path(root) / name)
    check_digest(name, expected, sha, len(buf))
    return buf


def read_side_files(root: str | os.PathLike[str], manifest: Manifest) -> dict[str, bytes]:
    """Every non-weight file's verified bytes (small: config, tokenizer, templates)."""
    return {n: read_verified(root, n, manifest.files[n]).tobytes() for n in side_files(manifest)}


def iter_verified_safetensors(
    root: str | os.PathLike[str],
    expected: Mapping[str, FileDigest],
    names: Iterable[str] | None = None,
    workers: int | None = None,
    inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
) -> Iterator[tuple[str, dict[str, torch.Tensor], dict[str, str]]]:
    """Yield (file, tensors, metadata) per safetensors file, in order, each verified whole.

    Files are read and hashed ahead of the consumer by ``workers`` threads, holding at most
    ``inflight_bytes`` (or one file) that the consumer has not taken yet. Tensors are views
    of the verified private buffer, writable in place (decryption) without copy-on-write.
    """
    names = list(expected if names is None else names)
    pending: deque[tuple[str, Future[np.ndarray]]] = deque()
    width = _workers(len(names), workers)
    pool = ThreadPoolExecutor(width)
    try:
        queue, held = iter(names), 0
        nxt = next(queue, None)
        while nxt is not None or pending:
            while nxt is not None and len(pending) < width and (
                    not pending or held + expected[nxt].size <= inflight_bytes):
                pending.append((nxt, pool.submit(read_verified, root, nxt, expected[nxt])))
                held += expected[nxt].size
                nxt = next(queue, None)
            name, future = pending.popleft()
            buf = future.result()
            held -= expected[name].size
            tensors, metadata = parse_safetensors(torch.from_numpy(buf), Path(root) / name)
            yield name, tensors, metadata
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
