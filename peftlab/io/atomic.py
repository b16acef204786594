"""Atomic file writes: a reader sees the old file or the whole new one, never half of either.

Each write goes to a temporary file in the same folder (same file system, so the final rename is atomic),
is flushed and fsynced, then `os.replace`d over the target. A crash at any point leaves at most a stray
`.tmp-*` file, which no loader reads.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on error it is removed."""
    target = os.fspath(target)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.tmp-", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # the writer may have closed its handle: fsync through our own
            os.fsync(fh.fileno())
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
