"""Build once: artefacts cached under a key of their builder's source and parameters.

A changed builder (any byte of the source files named) or changed parameters give another
key, so a stale artefact is never reused; nothing is committed, a clean clone builds from
scratch. A file lock makes parallel test workers build each artefact once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from filelock import FileLock


def source_digest(sources: Iterable[Path]) -> str:
    """SHA-256 over the named files and every ``*.py`` under the named directories."""
    h = hashlib.sha256()
    for src in sources:
        files = sorted(src.rglob("*.py")) if src.is_dir() else [src]
        for f in files:  # names relative to the source: one key in every checkout
            h.update(f.relative_to(src.parent).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(params: dict, sources: Iterable[Path]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str) + source_digest(sources)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_build(root: Path, name: str, build: Callable[[Path], object]) -> Path:
    """``root / name``, built by ``build(tmp_dir)`` into a temporary directory and renamed
    into place once complete (an interrupted build is never reused)."""
    path = root / name
    done = root / f"{name}.complete"  # beside, not inside: checkpoints sign every file
    if done.exists() and path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if done.exists() and path.exists():
            return path
        tmp = root / f".{name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        build(tmp)
        tmp.rename(path)
        done.touch()
    return path
