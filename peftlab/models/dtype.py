"""Which dtype the frozen base model is held in: `auto | bf16 | fp16 | fp32`, resolved against the hardware.

`auto` is bf16 where the hardware computes it natively (a CUDA GPU that supports bf16; a CPU with the avx512_bf16
or amx_bf16 flag), else fp32. An explicit 16-bit choice the hardware cannot compute is refused before any weight
is read, in one line naming the fix:

- fp16 on a CPU without avx512_fp16 / amx_fp16: torch does run fp16 matmuls there, but emulated (measured on this
  project's 2-core avx512_bf16 CPU, torch 2.13: ten 1024 x 1024 matmuls took 22.5 s in fp16, 0.39 s in fp32 and
  0.16 s in bf16), so a run would crawl;
- bf16 on a CUDA GPU without bf16 (compute capability below 8.0).

bf16 asked explicitly on a CPU without native bf16 is allowed (torch computes it by conversion; slower than native,
not unusable) and the line saying which dtype the base got says so.

Only the frozen base takes this dtype: trainable tensors stay fp32 master weights (peftlab.core.model casts them
when it makes them trainable) and the training loop computes under autocast.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The names are torch-free (a run config checks model.dtype before torch is imported); the name -> torch.dtype
# tables DTYPES and NAMES are built on first use (module __getattr__ below).
DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]


@functools.cache
def _tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return dtypes, {v: k for k, v in dtypes.items()}


def __getattr__(name: str):
    if name == "DTYPES":
        return _tables()[0]
    if name == "NAMES":
        return _tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DtypeError(ValueError):
    """A base dtype that is not a known name, or that the hardware cannot compute; the message says the fix."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_cpu(dtype: torch.dtype, flags: frozenset[str] | None = None) -> str | None:
    """The CPU flag that makes `dtype` native here (e.g. "avx512_bf16"), or None."""
    import torch

    flags = cpu_flags() if flags is None else flags
    wanted = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}.get(dtype, ())
    return next((f for f in wanted if f in flags), None)


def _cuda_device(device) -> bool:
    import torch

    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def resolve_dtype(choice: str | torch.dtype | None, device=None) -> tuple[torch.dtype, str]:
    """(dtype, why) for `choice` on `device` (default: CUDA if available, else the CPU). `why` is the text shown in
    "peftlab: base in bf16 (auto: CPU has avx512_bf16)". Raises DtypeError for an unknown name or a dtype the
    hardware cannot compute (module docstring)."""
    import torch

    DTYPES, NAMES = _tables()
    if choice is None:
        choice = "fp32"
    if isinstance(choice, torch.dtype):
        if choice not in NAMES:
            raise DtypeError(f"A base dtype of {choice} is not supported; use one of {', '.join(DTYPE_CHOICES)}.")
        choice = NAMES[choice]
    if choice not in DTYPE_CHOICES:
        raise DtypeError(f"model dtype {choice!r} is not one of {', '.join(DTYPE_CHOICES)}; auto picks bf16 where the "
                         "hardware computes it natively, else fp32.")
    cuda = _cuda_device(device)
    if choice == "auto":
        if cuda:
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "auto: the CUDA GPU computes bf16"
            return torch.float32, "auto: this CUDA GPU has no bf16"
        flag = native_cpu(torch.bfloat16)
        if flag:
            return torch.bfloat16, f"auto: CPU has {flag}"
        return torch.float32, "auto: CPU has no avx512_bf16 / amx_bf16"
    dtype = DTYPES[choice]
    if dtype == torch.float32:
        return dtype, "asked"
    if cuda:
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name()
            raise DtypeError(f"model dtype bf16: this GPU ({name}) cannot compute bf16 (it needs compute capability "
                             "8.0+); use dtype fp16 or fp32 (or auto).")
        return dtype, "asked"
    flag = native_cpu(dtype)
    if flag:
        return dtype, f"asked; CPU has {flag}"
    if dtype == torch.float16:
        raise DtypeError("model dtype fp16: this CPU has no native fp16 arithmetic (no avx512_fp16 / amx_fp16 flag); "
                         "torch emulates it about 50x slower than fp32. Use dtype bf16 or fp32 (or auto).")
    return dtype, "asked; this CPU has no avx512_bf16 / amx_bf16, so bf16 is computed by conversion, slower"


def to_stderr(line: str) -> None:
    """load_model's `log` for commands: the dtype line on stderr, so that stdout stays the command's output (JSON
    metrics, generated text)."""
    print(line, file=sys.stderr, flush=True)


def describe(dtype: torch.dtype, why: str, quantised: bool = False) -> str:
    """The line a run prints first about its base, e.g. "peftlab: base in bf16 (auto: CPU has avx512_bf16)"."""
    extra = "; the targeted linear weights in 4-bit NF4, quantised as they are read" if quantised else ""
    return f"peftlab: base in {_tables()[1][dtype]} ({why}){extra}"


__all__ = ["DTYPES", "DTYPE_CHOICES", "DtypeError", "cpu_flags", "native_cpu", "resolve_dtype", "describe",
           "to_stderr"]
