"""The error every command raises for a problem the user can fix, and the one boundary every command runs in.

`report(err)` turns an exception into the one line `peftlab <command>: error: ...` (or None for a bug, which
keeps its traceback). Known errors are recognised by the names of peftlab's error classes, without importing
their modules (which would import torch): a failure before torch is imported is answered without importing it.
"""

from __future__ import annotations

import errno

MAX_MESSAGE = 1000  # characters of one error line; the rest (a pasted 10 MB string, say) is cut
DEBUG_ENV = "PEFTLAB_DEBUG"  # PEFTLAB_DEBUG=1 shows the full traceback, as --debug does


class CliError(Exception):
    """Printed as `peftlab <command>: error: <message>` with exit status 1, no traceback."""


# peftlab's error classes whose message already says what was wrong, what was seen and what to do (a subclass
# of one counts too). A command adding its own error class adds its name here.
KNOWN_ERRORS = {"CliError", "ConfigError", "DataError", "AdapterFileError", "FolderLockedError",
                "ModelSourceError", "TrainingDivergedError", "DtypeError", "ExportError"}

DISK_FULL = ("the disk is full (no space left on device){where}. Free some space or write to another disk "
             "(train.output_dir / the output folder); the folder being written still holds its previous content")


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _disk_full(err: BaseException) -> str | None:
    """The disk-full line if `err` (or what caused it) is one; libraries word it their own way: safetensors
    "No space left on device (os error 28)", torch.save "unexpected pos 10880 vs 10772"."""
    for e in _chain(err):
        text = str(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {e.filename}" if e.filename else ""
            return DISK_FULL.format(where=where)
        if "No space left on device" in text or "os error 28" in text:
            return DISK_FULL.format(where="")
        if "unexpected pos" in text and "inline_container" in text or text.startswith("unexpected pos"):
            return DISK_FULL.format(where=" (PyTorch could not finish writing a file: 'unexpected pos')")
    return None


def one_line(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE:,} more characters; --debug shows all)"
    return text


def report(err: BaseException) -> str | None:
    """The one-line message for a known error (without `error: `), or None for an unexpected one."""
    full = _disk_full(err)
    if full:
        return full
    if any(c.__name__ in KNOWN_ERRORS and c.__module__.startswith("peftlab.") for c in type(err).__mro__):
        return one_line(str(err)) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None:  # a path the user gave: missing, a folder, no access
        name = err.filename if isinstance(err.filename, str) else str(err.filename)
        return one_line(f"{err.strerror or err}: {name[:300]}. Check the path and its permissions")
    return None
