"""LoRA-FA's config: LoRA's, field for field, written to files as plain LoRA (peft_type "LORA")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..lora.config import LoraConfig


@dataclass
class LoraFaConfig(LoraConfig):
    """LoRA-FA (Zhang et al., 2023): LoRA with A frozen at its random init and only B trained.

    At inference a LoRA-FA adapter is an ordinary LoRA adapter (W + s B A), so its file is a plain LoRA file
    (peft_type "LORA", LoraConfig's keys only): PEFT, vLLM and peftlab's `lora` method load it as is. Reading such
    a file back therefore gives a `LoraConfig` (both A and B trainable with is_trainable=True); to continue
    training it as LoRA-FA, pass the config explicitly:
    `PeftModel.from_pretrained(model, folder, is_trainable=True, config=LoraFaConfig(**fields))`."""

    peft_type: ClassVar[str] = "LORA"
