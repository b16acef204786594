"""Adapter names. A name becomes a folder name (`save_pretrained(d)` writes adapter "x" to `d/x/`) and a segment
of parameter names (`lora_A.x.weight`), so it must be one harmless path component.
"""

from __future__ import annotations

MAX_NAME_LENGTH = 100  # a folder name; far below the usual 255-byte limit, and readable in messages


def clip(text: object, limit: int = 80) -> str:
    """`repr(text)`, cut to about `limit` characters: user strings echoed in errors stay one readable line."""
    shown = repr(text)
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}... ({len(shown) - limit} more characters)"


def check_adapter_name(name: object) -> str:
    """Return `name` if it is a valid adapter name, else raise ValueError saying why and what to use.

    Valid: a non-empty str of at most MAX_NAME_LENGTH characters without '/', '\\', '.', NUL or other control
    characters (so no absolute path, no '..', no hidden file; dots would also split parameter names)."""
    if not isinstance(name, str):
        raise ValueError(f"An adapter name must be a string, got {type(name).__name__} {clip(name)}.")
    problem = None
    if not name:
        problem = "it is empty"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"it has {len(name)} characters (at most {MAX_NAME_LENGTH})"
    elif "/" in name or "\\" in name:
        problem = "it contains a path separator (it would write outside the save folder)"
    elif "." in name:
        problem = "it contains a dot (a path like '..' escapes the save folder, and dots split parameter names)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "it contains a control character (NUL, newline, ...)"
    if problem:
        raise ValueError(f"Adapter name {clip(name)} is not valid: {problem}. Use a short name of letters, digits, "
                         "'-' and '_', e.g. 'default' or 'sentiment_v2'.")
    return name
