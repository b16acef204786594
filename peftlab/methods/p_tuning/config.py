"""PromptEncoderConfig (P-tuning): PEFT's names and defaults (Liu et al. 2021, "GPT Understands, Too")."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

from ...core.config import check_choice, check_number
from ..prompt_tuning.prompt_learning import PromptLearningConfig

ENCODERS = ("MLP", "LSTM")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: the virtual tokens are the output of a small trainable prompt encoder (an MLP, or a bidirectional
    LSTM followed by an MLP) applied to trainable input embeddings; the model stays frozen."""

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    """The prompt encoder: "MLP" (Linear D->h, ReLU, Linear h->h, ReLU, Linear h->D) or "LSTM" (a bidirectional LSTM
    of encoder_num_layers layers, width h, then Linear 2h->2h, ReLU, Linear 2h->D)."""

    encoder_hidden_size: int | None = None
    """h, the encoder's hidden width. None: the model's hidden size D."""

    encoder_num_layers: int = 2
    """LSTM layers (LSTM only; the MLP always has its 3 linear layers, and another value only warns, as in PEFT)."""

    encoder_dropout: float = 0.0
    """Dropout between the LSTM's layers (LSTM with encoder_num_layers > 1 only)."""

    def __post_init__(self) -> None:
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        self.encoder_reparameterization_type = kind
        check_choice("PromptEncoderConfig", "encoder_reparameterization_type", kind, ENCODERS)
        super().__post_init__()
        if self.encoder_hidden_size is not None:
            check_number("PromptEncoderConfig", "encoder_hidden_size", self.encoder_hidden_size, low=1, integer=True)
        check_number("PromptEncoderConfig", "encoder_num_layers", self.encoder_num_layers, low=1, integer=True)
        check_number("PromptEncoderConfig", "encoder_dropout", self.encoder_dropout, low=0, high=1,
                     high_inclusive=False)
        if kind == "MLP" and self.encoder_num_layers != 2:
            warnings.warn(f"PromptEncoderConfig: encoder_num_layers={self.encoder_num_layers} is ignored for the MLP "
                          "encoder, which always has 3 linear layers (as in PEFT); it sets the LSTM's depth.")
