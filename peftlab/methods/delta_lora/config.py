"""Delta-LoRA's config: LoRA's fields plus the update ratio and the warm-up of the base-weight update.

The adapter file is a LoRA file (`"peft_type": "LORA"`, so HF PEFT loads it as LoRA) that also carries
`delta_lambda` and `update_start_step`; those two keys are how peftlab tells a Delta-LoRA file from a plain LoRA one
(`claims_file`, read by `peftlab.core.method.method_for_peft_type`). PEFT ignores them with a warning
("Unexpected keyword arguments ... for class LoraConfig, these are ignored").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...core.config import ConfigError, check_number
from ..lora.config import LoraConfig


@dataclass
class DeltaLoraConfig(LoraConfig):
    """Delta-LoRA (Zi et al., 2023): LoRA whose base weight also moves, after each optimizer step t past the
    warm-up, by W <- W + delta_lambda * s * (B_t A_t - B_{t-1} A_{t-1}), s = lora_alpha / r. Every LoRA field
    means what it means for LoRA, except that the adapter branch has no dropout. See
    peftlab/methods/delta_lora/__init__.py for the math and the files."""

    delta_lambda: float = 0.5
    """The update ratio lambda: how much of each step's change of the low-rank product s B A is also added to
    the base weight W (>= 0; 0 is plain LoRA)."""

    update_start_step: int = 500
    """Warm-up (the paper's start steps K): the base weight starts to move after this many optimizer steps,
    i.e. from step update_start_step + 1 on, when B A has moved away from its zero start."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_number(name, "delta_lambda", self.delta_lambda, low=0)
        check_number(name, "update_start_step", self.update_start_step, low=0, integer=True)
        if self.lora_dropout != 0:
            raise ConfigError(
                f"{name}.lora_dropout={self.lora_dropout!r} is not valid; Delta-LoRA has no dropout on the adapter "
                "branch (the paper removes it so that the gradient of B A is the gradient W itself would get, "
                "which is what makes the change of B A a sensible update for W). Set lora_dropout=0."
            )

    @classmethod
    def claims_file(cls, config_dict: dict[str, Any]) -> bool:
        """True for a LORA adapter_config.json that carries Delta-LoRA's `delta_lambda`."""
        return "delta_lambda" in config_dict
