"""Command-line options several subcommands share, defined without importing torch (argument parsing stays fast)."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
"""peftlab.models.dtype.DTYPE_CHOICES, repeated here so that parsing does not import torch (a test keeps them equal)."""


def add_dtype_argument(parser: argparse.ArgumentParser, default: str | None, note: str) -> None:
    """`--dtype`: the dtype the frozen base model is loaded in (peftlab.models.dtype)."""
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=default,
                        help="dtype of the frozen base: auto (bf16 where the hardware computes it natively, else "
                             f"fp32), bf16, fp16 or fp32; {note}")
