"""LoRA: low-rank updates on linear, Conv1D, embedding and conv layers."""

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from .combine import combine_lora
from .config import LoraConfig
from .layer import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear

METHOD = register(Method(
    name="lora",
    config_cls=LoraConfig,
    layers=((nn.Linear, LoraLinear), (Conv1D, LoraLinear), (nn.Embedding, LoraEmbedding), (nn.Conv2d, LoraConv2d)),
    summary="Low-rank update W + (alpha/r) B A on linear/Conv1D/embedding/conv layers (rsLoRA via use_rslora)",
    default_targets=ATTENTION_QV_TARGETS,
    combine=combine_lora,
))

__all__ = ["LoraConfig", "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv2d", "METHOD"]
