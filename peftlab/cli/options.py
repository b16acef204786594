"""Command-line options several subcommands share, defined without importing torch (argument parsing stays fast)."""

from __future__ import annotations

import argparse

from ..models.dtype import DTYPE_CHOICES  # torch-free: the names only


def add_dtype_argument(parser: argparse.ArgumentParser, default: str | None, note: str) -> None:
    """`--dtype`: the dtype the frozen base model is loaded in (peftlab.models.dtype)."""
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=default,
                        help="dtype of the frozen base: auto (bf16 where the hardware computes it natively, else "
                             f"fp32), bf16, fp16 or fp32; {note}")
