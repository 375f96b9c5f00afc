"""Atomic filesystem writes: a directory or file appears whole, or not at all.

Everything vllm-guard writes for later use (locked checkpoints, trained models, the demo
cache, manifests) goes through here, so a crash never leaves a half-written artefact that a
later run would trust.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vllm_guard.errors import GuardError, OutputExistsError


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories can't)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` before it is renamed into place."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(dirpath)


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Write into a temporary sibling and rename at the end; nothing half-written survives.
    An existing non-empty ``out_dir`` is an error unless ``replace`` (then it is swapped out)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not replace:
        raise OutputExistsError(f"output directory {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        fsync_tree(tmp)  # data on disk before the rename makes it visible
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: filesystem/kernel can't exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


@contextmanager
def atomic_replace_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build the new contents of existing directory ``target`` in a sibling, then swap.

    The swap is one atomic ``renameat2(RENAME_EXCHANGE)``: readers see the old directory or
    the new one, and an interrupted run leaves ``target`` untouched. Where the exchange is
    unsupported the fallback is two renames; a crash between them leaves the old directory,
    intact, at ``.NAME.old-*`` beside it (the error says so).
    """
    target = Path(target).resolve()  # swap the real directory, never a symlink to it
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(tmp, target.stat().st_mode & 0o7777)
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _exchange(tmp, target):
        fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old contents
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError as e:
        raise GuardError(f"could not move the new contents into {target} ({e.strerror}); "
                            f"the old one is intact at {old}") from None
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
