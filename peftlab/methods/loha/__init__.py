"""LoHa: a low-rank Hadamard-product update (W1a W1b) ⊙ (W2a W2b) on linear, Conv1D and conv layers (layer.py)."""

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from .config import LoHaConfig
from .lycoris_config import LycorisConfig
from .layer import LoHaLayer, LycorisLayer

METHOD = register(Method(
    name="loha",
    config_cls=LoHaConfig,
    layers=((nn.Linear, LoHaLayer), (Conv1D, LoHaLayer), (nn.Conv2d, LoHaLayer)),
    summary="LoHa (LyCORIS): W + (alpha/r) (W1a W1b) ⊙ (W2a W2b), rank up to r² for two rank-r pairs (files: LOHA)",
    default_targets=ATTENTION_QV_TARGETS,  # PEFT's LoHa defaults are its LoRA ones
))

__all__ = ["LoHaConfig", "LycorisConfig", "LoHaLayer", "LycorisLayer", "METHOD"]
