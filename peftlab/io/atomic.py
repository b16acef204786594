"""Atomic file and folder writes: a reader sees the old file (folder) or the whole new one, never half of either.

A file write goes to a temporary file in the same folder (same file system, so the final rename is atomic),
is flushed and fsynced, then `os.replace`d over the target. A crash at any point leaves at most a stray
`.tmp-*` file, which no loader reads. Whole folders: `atomic_folder` below.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on error it is removed."""
    target = os.fspath(target)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fault_point(f"create a temporary for {os.path.basename(target)}")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.tmp-", dir=folder)
    os.close(fd)
    try:
        fault_point(f"write {os.path.basename(target)}")
        yield tmp
        fault_point(f"fsync {os.path.basename(target)}")
        with open(tmp, "rb+") as fh:  # the writer may have closed its handle: fsync through our own
            os.fsync(fh.fileno())
        fault_point(f"rename into {os.path.basename(target)}")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def atomic_write_with(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run `write(tmp_path)` (e.g. safetensors' save_file) and move the result into place atomically."""
    with atomic_path(target) as tmp:
        write(tmp)


# ---- whole folders --------------------------------------------------------------------------------------------
#
# A folder (adapter, merged model, checkpoint, compare run) is several files that only make sense together: new
# weights beside an old config load with the wrong scaling. So a folder is never changed in place. The complete
# new content is built in a staging folder beside it (same parent, same file system), every file fsynced, and
# then swapped in:
#   - with renameat2(RENAME_EXCHANGE) (Linux >= 3.15; ext4, xfs, btrfs, tmpfs): one system call exchanges the two
#     names, so the path holds the old folder or the new one at every instant; the old one, now under the
#     staging name, is deleted after.
#   - elsewhere: target -> backup name, staging -> target. A kill between the two renames leaves no folder at the
#     path but a complete backup; `recover_folder` (run by every writer and by the adapter loader) renames it back.
# Temporaries are hidden names `.NAME.peftlab-{new,old,del}-PID-RANDOM`: no loader reads them, and a later write
# to the same path deletes those whose process is gone.

TEMP_MARK = ".peftlab-"
_ACTIVE: set[str] = set()  # staging/backup folders this process is using right now (not stale)

# Tests set this to a function called with a short description before every change a folder write makes on disk
# (mkdir, each file, fsync, rename, delete): it can snapshot the disk there, as a kill at that instant leaves it,
# or raise to simulate a failing write. None in normal use.
fault_hook: Callable[[str], None] | None = None
use_exchange = True  # tests turn it off to check the two-rename fallback too


def fault_point(what: str) -> None:
    if fault_hook is not None:
        fault_hook(what)


def _temp_name(target: str, kind: str) -> str:
    head, base = os.path.split(os.path.abspath(target))
    return os.path.join(head, f".{base}{TEMP_MARK}{kind}-{os.getpid()}-{os.urandom(4).hex()}")


def _owner_alive(name: str) -> bool:
    """Is the process that made temporary `name` (its PID is in the name) still running?"""
    try:
        pid = int(name.rsplit("-", 2)[-2])
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # ours: only the ones in _ACTIVE are in use, and the caller checks that
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _temporaries(target: str, kind: str) -> list[str]:
    head, base = os.path.split(os.path.abspath(target))
    prefix = f".{base}{TEMP_MARK}{kind}-"
    try:
        names = os.listdir(head)
    except FileNotFoundError:
        return []
    return [os.path.join(head, n) for n in sorted(names) if n.startswith(prefix)]


def recover_folder(target: str | os.PathLike) -> None:
    """Undo what a killed folder write left behind at `target`: put a complete backup back if the path is empty
    (the fallback's window between its two renames), and delete stale staging/backup folders."""
    target = os.fspath(target)
    for kind in ("old", "new", "del"):
        for tmp in _temporaries(target, kind):
            if tmp in _ACTIVE or _owner_alive(os.path.basename(tmp)):
                continue
            if kind == "old" and not os.path.lexists(target):
                fault_point(f"rename {os.path.basename(tmp)} back to {os.path.basename(target)}")
                os.rename(tmp, target)  # the old folder was complete when it was moved aside
                continue
            fault_point(f"delete stale {os.path.basename(tmp)}")
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(folder: str) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory; the rename is still atomic
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_tree(src: str, dst: str, skip: Callable[[str], bool]) -> None:
    """Recreate `src` under `dst` with hard links (no data copied; a copy where links are not supported). Files are
    only ever replaced by rename, never rewritten in place, so the old folder is not changed through the links."""
    for name in os.listdir(src):
        if skip(name) or TEMP_MARK in name:
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) and not os.path.islink(s):
            os.mkdir(d)
            _link_tree(s, d, lambda _n: False)
        else:
            try:
                os.link(s, d, follow_symlinks=False)
            except OSError:
                shutil.copy2(s, d, follow_symlinks=False)


_libc = None


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange the names `a` and `b` (both exist). False where the system cannot."""
    global _libc
    if not use_exchange or not sys.platform.startswith("linux"):
        return False
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:  # glibc < 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno_ = ctypes.get_errno()
    if errno_ in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):  # file system without exchange
        return False
    raise OSError(errno_, os.strerror(errno_), a, None, b)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, keep_existing: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yield an empty staging folder beside `target`; when the block ends without error, the staging folder
    replaces `target` whole (see above). On error the staging folder is deleted and `target` is untouched.

    keep_existing(name) -> True: entries of the current `target` folder to carry into the new one (hard-linked
    before the block runs), e.g. everything but the files an adapter save rewrites."""
    target = os.path.abspath(os.fspath(target))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder; pass a folder path", target)
    if holds_cwd(target):
        raise IsADirectoryError(errno.EISDIR, "is the working folder (or holds it) and cannot be replaced whole; "
                                "write to a subfolder", target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    recover_folder(target)
    staging = _temp_name(target, "new")
    _ACTIVE.add(staging)
    try:
        fault_point(f"mkdir {os.path.basename(staging)}")
        os.mkdir(staging)
        if keep_existing is not None and os.path.isdir(target):
            _link_tree(target, staging, lambda name: not keep_existing(name))
        yield staging
        fault_point(f"fsync {os.path.basename(staging)}")
        _fsync_tree(staging)
        _swap_in(staging, target)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise
    finally:
        _ACTIVE.discard(staging)


def holds_cwd(target: str | os.PathLike) -> bool:
    """Is `target` the working folder or one above it? Swapping it would leave this process in a deleted folder."""
    target, cwd = os.path.realpath(target), os.path.realpath(os.getcwd())
    return cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep)


def _swap_in(staging: str, target: str) -> None:
    name = os.path.basename(target)
    if not os.path.lexists(target):
        fault_point(f"rename staging to {name}")
        os.rename(staging, target)
    else:
        fault_point(f"exchange staging and {name}")
        if not _exchange(staging, target):
            backup = _temp_name(target, "old")
            _ACTIVE.add(backup)
            try:
                fault_point(f"rename {name} aside")
                os.rename(target, backup)
                fault_point(f"rename staging to {name}")
                os.rename(staging, target)
            finally:
                _ACTIVE.discard(backup)
            staging = backup
        _fsync_dir(os.path.dirname(target))
        fault_point(f"delete the old {name}")
        shutil.rmtree(staging, ignore_errors=True)  # the old content; a kill here leaves a stale temporary
    _fsync_dir(os.path.dirname(target))


def remove_folder(target: str | os.PathLike) -> None:
    """Delete a folder so that no reader ever sees it half-deleted: renamed to a hidden temporary first."""
    target = os.fspath(target)
    if not os.path.lexists(target):
        return
    doomed = _temp_name(target, "del")
    fault_point(f"rename {os.path.basename(target)} for deletion")
    os.rename(target, doomed)
    fault_point(f"delete {os.path.basename(doomed)}")
    shutil.rmtree(doomed, ignore_errors=True)
