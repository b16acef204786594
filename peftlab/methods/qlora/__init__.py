"""QLoRA (Dettmers et al., 2023): LoRA on frozen 4-bit NF4 base weights with double-quantised scales.

The format in plain torch (quantise, pack, dequantise; memory and error bounds) is peftlab/kernels/nf4.py, beside its
Triton twin; bnb.py uses bitsandbytes' kernels for it where installed; layer.py holds the NF4 base layer and the LoRA
wrapper (forward, merging, unloading); config.py the config; load.py quantises the targeted weights as the checkpoint
is read (`peftlab train`, or `load_model(..., quantize=METHOD.quantize_at_load(config))`), so the full-precision base
is never held. Files are plain LoRA files (peft_type "LORA")."""

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from ..lora.combine import combine_lora
from ..lora.config import init_key
from .config import QLoraConfig
from .layer import NF4Linear, QLoraLinear
from .load import quantize_at_load
from ...kernels.nf4 import dequantize_nf4, quantize_nf4

METHOD = register(Method(
    name="qlora",
    config_cls=QLoraConfig,
    # NF4Linear: the base of an existing QLoRA layer, so that a second QLoRA adapter joins the same wrapper.
    layers=((nn.Linear, QLoraLinear), (Conv1D, QLoraLinear), (NF4Linear, QLoraLinear)),
    summary="QLoRA: LoRA on frozen 4-bit NF4 base weights (double-quantised scales), dequantised per matmul "
            "(files: LORA)",
    default_targets=ATTENTION_QV_TARGETS,
    combine=combine_lora,
    # LoftQ picks the 4-bit weights itself from the full-precision ones (lora/loftq.py): the base loads unquantised.
    quantize_at_load=lambda config: (None if init_key(config.init_lora_weights) == "loftq"
                                     else quantize_at_load(config, ATTENTION_QV_TARGETS)),
))

__all__ = ["QLoraConfig", "QLoraLinear", "NF4Linear", "quantize_nf4", "dequantize_nf4", "quantize_at_load", "METHOD"]
