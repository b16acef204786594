"""Full fine-tuning's config, apart from the method's torch code: a run config is checked without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig


@dataclass
class FullConfig(AdapterConfig):
    """Full fine-tuning: all parameters train (minus `exclude_modules`). Memory: AdamW keeps two fp32 moments per
    parameter, so training needs about 4x the fp32 model (weights, gradients, 2 moments): ~2.2 GB for SmolLM2-135M."""

    peft_type: ClassVar[str] = "FULL"
