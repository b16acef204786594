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
    # `model.dtype: auto` loads the base in fp32 for full fine-tuning: every base weight becomes an fp32 master copy
    # anyway, so a bf16 load saves no memory, and it starts training from weights rounded to bf16, which cost 11
    # accuracy points on the shipped comparison's budget (0.658 vs 0.767, 3 seeds each; docs/compare.md).
    auto_base_dtype: ClassVar[str | None] = "fp32"
