"""PrefixTuningConfig: PEFT's names and defaults (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import check_choice, check_number
from ..prompt_tuning.prompt_learning import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: num_virtual_tokens trainable key and value rows in front of every layer's attention; the model
    stays frozen. With prefix_projection, the rows come from a small MLP over trainable embeddings during training."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    prefix: ClassVar[bool] = True

    init_weights: str | None = None
    """None: random N(0, 1) prefix rows (PEFT's default). "zero": rows start at 0 (with prefix_projection, the MLP's
    last layer starts at 0); zero keys still take attention weight, so even this start changes the outputs."""

    encoder_hidden_size: int | None = None
    """Hidden width of the projection MLP (prefix_projection=True only). None: token_dim."""

    prefix_projection: bool = False
    """True: train embeddings (T, token_dim) and an MLP (Linear token_dim->h, Tanh, Linear h->num_layers x 2 x
    token_dim) that produces the prefixes (the paper's reparameterisation, steadier training); files keep only its
    output, as PEFT's do. False: train the prefix rows directly."""

    def __post_init__(self) -> None:
        check_choice("PrefixTuningConfig", "init_weights", self.init_weights, (None, "zero"))
        super().__post_init__()
        if self.encoder_hidden_size is not None:
            check_number("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size, low=1, integer=True)
        if not isinstance(self.prefix_projection, bool):
            check_choice("PrefixTuningConfig", "prefix_projection", self.prefix_projection, (True, False))
