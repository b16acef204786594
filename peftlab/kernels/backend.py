"""Which implementation of a fast path runs: `backend="auto" | "torch" | "triton"`.

- "torch": the pure-torch path (the reference numerics, any device).
- "triton": the Triton kernels; fails loudly, naming what is missing, when they cannot run.
- "auto": Triton when the tensors are on CUDA and triton imports; the torch path otherwise, quietly.

Triton kernels also run on CPU tensors under TRITON_INTERPRET=1 (the environment variable must be set before triton
is first imported); that is how the tests exercise them without a GPU. "auto" never picks the interpreter: it is
for testing, thousands of times slower than the torch path.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401  (a broken install can fail here rather than on `import triton`)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device` (None when they can)."""
    err = _triton_import_error()
    if err is not None:
        return (f"triton is not importable ({err}). Install it (`pip install triton`; CUDA builds of torch ship "
                "a matching one) or use backend='torch' / 'auto'.")
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"the tensors are on {device.type!r}, and the Triton kernels run on CUDA devices (on CPU only under "
            "TRITON_INTERPRET=1, set before triton is imported, for testing). Move the model to a CUDA device or "
            "use backend='torch' / 'auto'.")


def resolve(backend: str, device: torch.device) -> str:
    """'torch' or 'triton' for a requested backend and the device the tensors are on."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown kernel backend {backend!r}; choose one of {BACKENDS} "
                         "(auto: Triton on CUDA when available, else torch).")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_import_error() is None else "torch"
    reason = triton_unavailable(device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' was requested but cannot run: {reason}")
    return "triton"
