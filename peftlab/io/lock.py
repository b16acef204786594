"""One run per output folder: an OS file lock on `FOLDER/.peftlab.lock`, held while the run lasts.

The lock is `flock` on an open file, so the kernel drops it when the process ends, however it ends: a run
killed with SIGKILL leaves no lock behind, only the file with its PID in it. The file is emptied on a clean
release, so a non-empty file found on taking the lock names a run that ended without releasing it (killed or
crashed); the new run takes it over and says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator

LOCK_NAME = ".peftlab.lock"


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock."""


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(500).strip()
    except OSError:
        return ""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder", log=None) -> Iterator[None]:
    """Hold `folder`'s lock for the block; raise FolderLockedError at once (no waiting) if a live process holds it.
    `log(message)` hears about a stale lock taken over from a run that was killed."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path) or "a process that has not written its PID yet"
            raise FolderLockedError(
                f"{what} {folder!r} is in use by another peftlab run ({holder}); two runs in one folder would "
                "overwrite each other's adapter, checkpoints and metrics. Wait for it to finish, stop it, or choose "
                "another folder.") from None
        stale = _holder(path)
        if stale and log is not None:
            log(f"{folder}: taking over the lock of a run that ended without releasing it ({stale})")
        os.ftruncate(fd, 0)
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        os.pwrite(fd, f"PID {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n".encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: an empty file is not a stale lock
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
