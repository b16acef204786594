"""DoRA's config: LoRA's fields plus `use_dora: true`, which is how HF PEFT writes a DoRA adapter.

PEFT has no DORA peft_type: a DoRA file says `"peft_type": "LORA"` and `"use_dora": true`. `DoraConfig` therefore
subclasses `LoraConfig` (same fields, same file keys, same validation) and claims the LORA files whose `use_dora`
is true (`claims_file`, read by `peftlab.core.method.method_for_peft_type`); a LORA file without it stays plain LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...core.config import ConfigError
from ..lora.config import LoraConfig


@dataclass
class DoraConfig(LoraConfig):
    """DoRA (Liu et al., 2024): y = m * (W + s B A) x / ||W + s B A||_row + b, with m (out,) trained beside A and B;
    every LoRA field means what it means for LoRA. See peftlab/methods/dora/layer.py for the math."""

    use_dora: bool = True
    """Always true for DoRA; written to adapter_config.json because that key is what tells HF PEFT (and peftlab)
    that a "LORA" file is a DoRA adapter. Use LoraConfig for plain LoRA."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora is not True:
            raise ConfigError(
                f"DoraConfig.use_dora={self.use_dora!r} is not valid; a DoraConfig is always DoRA (use_dora=True). "
                "For plain LoRA use LoraConfig instead."
            )

    @classmethod
    def claims_file(cls, config_dict: dict[str, Any]) -> bool:
        """True for a PEFT LORA adapter_config.json with `"use_dora": true`."""
        return config_dict.get("use_dora") is True
