"""BitFit's config, apart from the method's torch code: a run config is checked without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit: the biases of the base model train, nothing else (a SEQ_CLS head trains too, as modules_to_save).
    `target_modules` narrows which modules' biases train (same matching rules as for adapters; None: all of them,
    e.g. ["query", "intermediate.dense"] is the paper's two-bias subset on BERT); `exclude_modules` removes some."""

    peft_type: ClassVar[str] = "BITFIT"
