"""Bottleneck adapters' config. HF PEFT has no such method: the tag is peftlab's own ("BOTTLENECK")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig, check_choice, check_number

# non_linearity -> the torch.nn activation class the layer builds (GELU: the exact erf form, as BERT's), by name so
# that the config imports no torch.
ACTIVATIONS = {"relu": "ReLU", "gelu": "GELU", "silu": "SiLU", "tanh": "Tanh"}
# The placements; which modules each one means per architecture is the PLACEMENTS table in __init__.py.
PLACEMENT_NAMES = ["houlsby", "pfeiffer"]


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020): after a sublayer's output projection,
    h -> h + up(act(down(h))), with down (d -> d / reduction_factor) and up (back to d, initialised to zero, so
    the adapter starts as identity). Non-linear: it cannot be merged into the base weights."""

    peft_type: ClassVar[str] = "BOTTLENECK"

    reduction_factor: int = 16
    """The bottleneck is m = d / reduction_factor wide, d being the adapted sublayer's output size (the hidden
    size): e.g. 576 / 16 = 36. Must be an integer >= 1 that divides d. Each adapter holds 2 d m + d + m numbers
    (down and up weights and biases)."""

    non_linearity: str = "relu"
    """Activation between the projections: "relu", "gelu", "silu" or "tanh"."""

    placement: str = "houlsby"
    """Where adapters go when target_modules is not set. "houlsby" (Houlsby et al. 2019): after the attention
    block's output projection and after the MLP's output projection, in every layer (T5: after self-attention,
    cross-attention and the MLP). "pfeiffer" (Pfeiffer et al. 2020): after the MLP's output projection only (half the
    adapters). The modules per architecture are listed in peftlab/methods/bottleneck/__init__.py; an explicit
    target_modules overrides them."""

    adapter_dropout: float = 0.0
    """Dropout probability on the adapter branch's output, before it is added to h; the base path never sees
    dropout."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_number(name, "reduction_factor", self.reduction_factor, low=1, integer=True)
        check_choice(name, "non_linearity", self.non_linearity, ACTIVATIONS)
        check_choice(name, "placement", self.placement, PLACEMENT_NAMES)
        check_number(name, "adapter_dropout", self.adapter_dropout, low=0, high=1, high_inclusive=False)
