"""LoRA+'s config: LoRA's fields plus the two learning-rate options of PEFT's `create_loraplus_optimizer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import check_number
from ..lora.config import LoraConfig


@dataclass
class LoraPlusConfig(LoraConfig):
    """LoRA+ (Hayou et al., 2024): LoRA whose B learns at loraplus_lr_ratio times A's learning rate.

    The adapter itself is plain LoRA (W + s B A); only the optimizer differs. Files are therefore plain LoRA files
    (peft_type "LORA" without the two loraplus_* keys, which change nothing the adapter computes): PEFT and vLLM
    load them as LoRA, and peftlab reads them back as `lora`."""

    peft_type: ClassVar[str] = "LORA"
    file_omits: ClassVar[tuple[str, ...]] = ("loraplus_lr_ratio", "loraplus_lr_embedding")

    loraplus_lr_ratio: float = 16.0
    """Learning rate of B (and of 1-D tensors: trained biases) divided by A's, which is the run's lr (PEFT's
    `loraplus_lr_ratio`; the paper recommends about 16 and, with it, a base lr about half a plain LoRA one)."""

    loraplus_lr_embedding: float = 1e-6
    """Learning rate (absolute, not a ratio) of both A and B on embedding layers, as PEFT's
    `create_loraplus_optimizer` sets them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_number(name, "loraplus_lr_ratio", self.loraplus_lr_ratio, low=0, low_inclusive=False)
        check_number(name, "loraplus_lr_embedding", self.loraplus_lr_embedding, low=0)
