"""LoKr: a Kronecker-product update W1 ⊗ W2 (W2 low-rank) on linear, Conv1D and conv layers (see layer.py)."""

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from .config import LoKrConfig
from .layer import LoKrLayer, factorization

METHOD = register(Method(
    name="lokr",
    config_cls=LoKrConfig,
    layers=((nn.Linear, LoKrLayer), (Conv1D, LoKrLayer), (nn.Conv2d, LoKrLayer)),
    summary="LoKr (LyCORIS): W + (alpha/r) W1 ⊗ W2 with W2 = W2a W2b of rank r, a Kronecker-factored update "
            "(files: LOKR)",
    default_targets=ATTENTION_QV_TARGETS,  # PEFT's LoKr defaults are its LoRA ones
))

__all__ = ["LoKrConfig", "LoKrLayer", "factorization", "METHOD"]
