"""LoRA-FA: LoRA with the down-projection A frozen at its random init; only B trains (see layer.py).

Files are plain LoRA files (peft_type "LORA"): a LoRA-FA adapter computes W + s B A like any LoRA adapter, so
PEFT and vLLM load it unchanged, and peftlab reads it back as `lora` (right for inference; see LoraFaConfig for
continuing LoRA-FA training from a file)."""

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from .config import LoraFaConfig
from .layer import LoraFaFunction, LoraFaLinear

METHOD = register(Method(
    name="lora_fa",
    config_cls=LoraFaConfig,
    layers=((nn.Linear, LoraFaLinear), (Conv1D, LoraFaLinear)),
    summary="LoRA-FA: LoRA with A frozen at init, only B trains; keeps only A x (r-dim) for backward (files: LORA)",
    default_targets=ATTENTION_QV_TARGETS,
))

__all__ = ["LoraFaConfig", "LoraFaLinear", "LoraFaFunction", "METHOD"]
