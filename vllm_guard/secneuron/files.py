"""A locked checkpoint's files against its signed manifest: the file set, sizes, SHA-256 of
whole files, the signed version. No torch: ``vllm-guard serve`` runs these checks in its
parent process before it execs vLLM (:mod:`vllm_guard.secneuron.preflight`); the streaming
check of weight shards is in :mod:`vllm_guard.secneuron.verify`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vllm_guard.errors import ManifestError
from vllm_guard.secneuron.crypto import DIGEST_BLOCK_BYTES, digest_equal, hash_blocks, hash_file
from vllm_guard.secneuron.manifest import MANIFEST_NAME, MANIFEST_TMP, FileDigest, Manifest
from vllm_guard.secneuron.threads import loader_pool

WEIGHT_SUFFIX = ".safetensors"


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


def checkpoint_files(root: str | os.PathLike[str]) -> list[str]:
    """Every file under ``root`` (relative POSIX paths, sorted) except the manifest.

    These are what the manifest signs: anything vLLM or transformers might read. A symbolic
    link to a directory is listed as itself, so it can never match a signed file.
    """
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        links = [d for d in dirnames if (here / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if d not in links)
        for name in [*filenames, *links]:
            rel = (here / name).relative_to(root).as_posix()
            if rel not in (MANIFEST_NAME, MANIFEST_TMP):
                out.append(rel)
    return sorted(out)


def is_weight_file(name: str) -> bool:
    """Top-level ``*.safetensors``: what the loader streams (everything else is a side file)."""
    return name.endswith(WEIGHT_SUFFIX) and "/" not in name


def weight_files(manifest: Manifest) -> list[str]:
    return sorted(n for n in manifest.files if is_weight_file(n))


def side_files(manifest: Manifest) -> list[str]:
    return sorted(n for n in manifest.files if not is_weight_file(n))


def pool_workers(n_items: int, workers: int | None) -> int:
    """Threads for ``n_items`` hashing jobs: the ``workers`` option, else up to 8 cores."""
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
                 workers: int | None = None,
                 block_bytes: int = DIGEST_BLOCK_BYTES) -> dict[str, FileDigest]:
    """Whole-file SHA-256, size and per-block BLAKE3 of each file. The whole-file hashes
    run one per thread; block hashes fill the other threads (runs of 4 blocks)."""
    names = list(names)
    sizes = {n: (Path(root) / n).stat().st_size for n in names}
    run = 4
    with loader_pool(pool_workers(2 * len(names), workers)) as pool:
        whole = {n: pool.submit(hash_file, Path(root) / n) for n in names}
        parts = {n: [pool.submit(hash_blocks, Path(root) / n, block_bytes, i,
                                 min(run, -(-sizes[n] // block_bytes) - i))
                     for i in range(0, -(-sizes[n] // block_bytes), run)] for n in names}
        out = {}
        for n in names:
            sha, size = whole[n].result()
            blocks = tuple(b for f in parts[n] for b in f.result())
            if size != sizes[n] or len(blocks) != -(-size // block_bytes):
                raise IntegrityError(f"file {n} changed size while it was being hashed")
            out[n] = FileDigest(sha, size, block_bytes, blocks)
        return out


def verify_files(root: str | os.PathLike[str], manifest: Manifest, names: Iterable[str],
                 workers: int | None = None) -> int:
    """Hash the named files and check each against the manifest; returns the bytes checked."""
    got = digest_files(root, names, workers)
    for name, d in got.items():
        check_digest(name, manifest.files[name], d.sha256, d.size)
    return sum(d.size for d in got.values())


COPY_CHUNK_BYTES = 1 << 20


def copy_verified(root: str | os.PathLike[str], manifest: Manifest, names: Iterable[str],
                  dest: str | os.PathLike[str]) -> int:
    """Copy each named file from ``root`` into ``dest`` (new files, mode 0600), hashing the
    bytes as they are copied, and check each against the manifest; returns the bytes copied.

    Each file is read once: the copy holds exactly the bytes that were hashed, whatever
    happens to the original afterwards. A mismatch raises IntegrityError with the partial
    copy left in ``dest`` (the caller's private directory, never handed to anyone then).
    """
    total = 0
    for name in names:
        target = Path(dest) / name
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        sha, size = hashlib.sha256(), 0
        src = os.open(Path(root) / name, os.O_RDONLY)
        try:
            out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                while chunk := os.read(src, COPY_CHUNK_BYTES):
                    sha.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
                    size += len(chunk)
            finally:
                os.close(out)
        finally:
            os.close(src)
        check_digest(name, manifest.files[name], sha.hexdigest(), size)
        total += size
    return total


def check_copy(copy: str | os.PathLike[str], manifest: Manifest,
               workers: int | None = None) -> None:
    """``copy`` (what ``vllm-guard serve`` handed vLLM as ``--model``) holds exactly the
    checkpoint's signed side files, unchanged: no weight, nothing unsigned, nothing edited."""
    present, wanted = set(checkpoint_files(copy)), set(side_files(manifest))
    if present != wanted:
        odd = sorted(present ^ wanted)[0]
        raise IntegrityError(f"model directory {copy} is not a copy of the checkpoint's signed "
                             f"side files (file {odd} {'missing' if odd in wanted else 'added'})")
    verify_files(copy, manifest, sorted(wanted), workers)
