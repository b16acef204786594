"""OFT: orthogonal fine-tuning, a trained block-diagonal rotation of each adapted layer's input (see layer.py)."""

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from .config import OFTConfig
from .layer import OFTLayer, OFTRotation

METHOD = register(Method(
    name="oft",
    config_cls=OFTConfig,
    layers=((nn.Linear, OFTLayer), (Conv1D, OFTLayer)),
    summary="OFT: W R^T with R block-diagonal orthogonal (Cayley map of trained skew-symmetric blocks; COFT, "
            "block sharing) (files: OFT)",
    default_targets=ATTENTION_QV_TARGETS,  # PEFT's OFT defaults are its LoRA ones
))

__all__ = ["OFTConfig", "OFTLayer", "OFTRotation", "METHOD"]
