"""LoRA+: LoRA whose B trains at `loraplus_lr_ratio` times A's learning rate (see groups.py).

The ratio is declared through the Method's `param_groups` hook, which `PeftModel.optimizer_param_groups` (and
so the training loop) applies; the layers are LoRA's. Files are plain LoRA files (peft_type "LORA")."""

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from ..lora.combine import combine_lora
from ..lora.layer import LoraConv2d, LoraEmbedding, LoraLinear
from .config import LoraPlusConfig
from .groups import loraplus_param_groups

METHOD = register(Method(
    name="lora_plus",
    config_cls=LoraPlusConfig,
    layers=((nn.Linear, LoraLinear), (Conv1D, LoraLinear), (nn.Embedding, LoraEmbedding), (nn.Conv2d, LoraConv2d)),
    summary="LoRA+: LoRA with B trained at loraplus_lr_ratio x A's learning rate (default 16; files: LORA)",
    default_targets=ATTENTION_QV_TARGETS,
    param_groups=loraplus_param_groups,
    combine=combine_lora,
))

__all__ = ["LoraPlusConfig", "loraplus_param_groups", "METHOD"]
