"""LoHa's config, with HF PEFT's field names and defaults (`peft.LoHaConfig`, peft_type "LOHA") so files interchange."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .lycoris_config import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa (Hyeon-Woo et al. 2022, FedPara; as in LyCORIS): W + (alpha / r) (W1a W1b) ⊙ (W2a W2b), the Hadamard
    product of two rank-r matrices, which can reach rank r² with the parameters of two rank-r LoRA updates."""

    peft_type: ClassVar[str] = "LOHA"
