"""DoRA (Liu et al., 2024): LoRA with the updated weight's per-output norm replaced by a trained magnitude,
y = m * (W + s B A) x / ||W + s B A||_row + b. Files are HF PEFT's (peft_type LORA, use_dora true); see layer.py."""

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from .config import DoraConfig
from .layer import DoraConv2d, DoraEmbedding, DoraLayer, DoraLinear

METHOD = register(Method(
    name="dora",
    config_cls=DoraConfig,
    layers=((nn.Linear, DoraLinear), (Conv1D, DoraLinear), (nn.Embedding, DoraEmbedding), (nn.Conv2d, DoraConv2d)),
    summary="LoRA split into direction and trained magnitude: m (W + s B A) / ||W + s B A|| (PEFT use_dora)",
    default_targets=ATTENTION_QV_TARGETS,
))

__all__ = ["DoraConfig", "DoraLayer", "DoraLinear", "DoraEmbedding", "DoraConv2d", "METHOD"]
