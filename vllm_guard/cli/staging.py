"""The private directory ``vllm-guard serve`` points vLLM's ``--model`` at for a locked
checkpoint: a copy of the signed side files (config, tokenizer, chat template, generation
config) made from the very bytes serve checked, so that nothing changed in the checkpoint
after the check (vLLM's API server reads the tokenizer seconds before the loader runs) is
ever read by vLLM. The weights stay in the checkpoint, read and verified there by the loader.

Where: ``$TMPDIR/vllm-guard-UID/KEY-SLOT/NAME``, every level mode 0700 and owned by this user
(a base directory anyone else could write is refused). KEY names the checkpoint's path and
NAME is its directory name, so vLLM sees the same ``--model`` run after run (its compile
cache is keyed by it); SLOT is the first one no running server holds (an flock), so two
servers of one checkpoint never share a copy.

Lifetime: vLLM inherits the slot's lock; a small watcher process (its own session, so a
signal to the server's process group does not reach it) waits for that lock, i.e. for the
server and every process it forked to exit, and then removes the copy and the slot's lock
file (if another server took the slot first, once that one has exited too). A watcher killed
too (SIGKILL) leaves the copy to the OS's temp cleanup; the next server of the same
checkpoint in that slot removes it before it stages its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vllm_guard.errors import GuardError

SLOTS = 64

# Runs in a fresh interpreter (-I -S: stdlib only, nothing from the environment): detaches
# (double fork, so it is never a child of vLLM), waits for the slot's lock, which the server
# holds until it and every process it forked have exited, then removes the copy. Whoever holds
# the lock of the slot's current lock file owns the slot: a new server that took the slot
# first is waited for in turn, and a lock file removed meanwhile means another watcher did it.
WATCHER = """
import fcntl, os, shutil, sys
lock, path = sys.argv[1], sys.argv[2]
if os.fork():
    os._exit(0)
try:
    held = os.open(lock, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    if os.stat(lock).st_ino != os.fstat(held).st_ino:
        os._exit(0)
except OSError:
    os._exit(0)
gone = path + ".gone-" + str(os.getpid())
try:
    os.rename(path, gone)  # out of the slot at once
except OSError:
    gone = None
os.unlink(lock)  # a claimer that opened it before this sees it unlinked and retries
os.close(held)
if gone:
    shutil.rmtree(gone, ignore_errors=True)
"""


@dataclass
class StagedDir:
    """A claimed slot: ``path`` is the directory to hand vLLM as ``--model``. The slot is
    held (and the copy kept) while any process holds the inheritable lock in ``fds``."""

    path: Path
    fds: tuple[int, ...] = field(repr=False)

    def close(self) -> None:
        """Give the slot back (as the server's exit does): the watcher removes the copy."""
        for fd in self.fds:
            os.close(fd)
        self.fds = ()


def private_base() -> Path:
    """``$TMPDIR/vllm-guard-UID``, created 0700; refused unless a directory (not a link) of
    this user that no one else may enter."""
    base = Path(tempfile.gettempdir()) / f"vllm-guard-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(base, 0o700)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise GuardError(f"{base} is not private (a directory of this user, mode 0700): "
                         "remove it or set TMPDIR to a directory of your own")
    return base


def _try_slot(lock: Path) -> int | None:
    """The slot's lock, held (an fd), or None if a running server holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a watcher removed the file we locked: lock the current one


def _watch(lock: Path, slot_dir: Path) -> None:
    """Start the watcher that removes ``slot_dir`` once no one holds ``lock``."""
    watcher = subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHER, str(lock),
                                str(slot_dir)], start_new_session=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    watcher.wait()  # the detached grandchild watches; this child exits at once


def claim(checkpoint: Path) -> StagedDir:
    """A fresh, empty private directory for a copy of ``checkpoint``'s side files, removed
    when this process and every process it execs or forks have exited."""
    base = private_base()
    key = hashlib.sha256(str(checkpoint).encode()).hexdigest()[:16]
    for slot in range(SLOTS):
        lock = _try_slot(base / f"{key}-{slot}.lock")
        if lock is None:
            continue
        slot_dir = base / f"{key}-{slot}"
        try:
            shutil.rmtree(slot_dir, ignore_errors=True)  # left by a server killed with -9
            os.mkdir(slot_dir, 0o700)
            _watch(base / f"{key}-{slot}.lock", slot_dir)
        except OSError as e:
            os.close(lock)
            raise GuardError(f"cannot make the private copy {slot_dir}: {e.strerror or e}"
                             ) from None
        path = slot_dir / (checkpoint.name or "model")
        os.mkdir(path, 0o700)  # in a directory just made, by us only
        os.set_inheritable(lock, True)  # held by vLLM across exec
        return StagedDir(path, (lock,))
    raise GuardError(f"{SLOTS} servers of {checkpoint} are running already (their copies are "
                     f"in {base}): stop one first")
