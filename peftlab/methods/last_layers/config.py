"""Last layers' config, apart from the method's torch code: a run config is checked without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig, check_number


@dataclass
class LastLayersConfig(AdapterConfig):
    """The last `num_layers` blocks of each block stack (T5: of the encoder and of the decoder) plus the output
    layer train, as saved copies (modules_to_save)."""

    peft_type: ClassVar[str] = "LAST_LAYERS"

    num_layers: int = 2
    """How many blocks, counted from the top of each stack, train."""

    train_head: bool = True
    """Also train the output layer (lm_head for causal LMs; a SEQ_CLS head always trains, it is new)."""

    blocks_name: str | None = None
    """Name of the module list(s) holding the blocks (e.g. "layers", "h", "block"). None: the common names."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(type(self).__name__, "num_layers", self.num_layers, low=1, integer=True)
