"""Fast paths, each beside its pure-torch reference (the reference is the CPU path and the tests' oracle).

- `fused_lora_linear` (lora_linear.py): the LoRA linear as one autograd node (Triton: the low-rank term in the
  base GEMM's epilogue).
- `fused_qlora_linear` (qlora_linear.py): the same node on a frozen NF4 weight (QLoRA), dequantised just before each
  GEMM and never saved (Triton: nf4_dequant.py's one-pass dequantisation; its reference, the NF4 format itself with
  quantisation, is nf4.py, which methods/qlora builds its layers on).
- `fused_dora_linear` (dora_linear.py): the DoRA linear as one node: the norm ||W + s B A|| without building
  W + s B A (`dora_weight_norm`), m / n applied in the base GEMM's epilogue (Triton).
- `chunked_linear_cross_entropy`: lm_head + cross-entropy over row chunks, never holding (N, V) fp32 logits.

Triton is imported only when a Triton path runs. `backend="auto"` uses Triton on CUDA when it imports and the torch
path otherwise; `backend="triton"` raises, saying what is missing, when it cannot run.
`enable(model, backend)` / `disable(model)` switch a LoRA model's linear layers onto the fused path (switch.py); each
layer decides per call whether the node computes its forward (LoRA's rules: methods/lora/fused.py). Nothing here
imports from the rest of peftlab: plain tensors in, tensors out.
"""

from .backend import BACKENDS, resolve, triton_unavailable
from .chunked_ce import chunked_linear_cross_entropy, linear_cross_entropy_reference
from .dora_linear import (DoraLinearFunction, dora_linear_reference, dora_weight_norm, dora_weight_norm_reference,
                          fused_dora_linear)
from .lora_linear import LoraLinearFunction, fused_lora_linear, lora_linear_reference
from .qlora_linear import fused_qlora_linear, qlora_linear_reference
from .switch import disable, enable

__all__ = ["enable", "disable", "BACKENDS", "resolve", "triton_unavailable", "fused_lora_linear",
           "lora_linear_reference", "LoraLinearFunction", "chunked_linear_cross_entropy",
           "linear_cross_entropy_reference", "fused_qlora_linear", "qlora_linear_reference", "fused_dora_linear",
           "dora_linear_reference", "dora_weight_norm", "dora_weight_norm_reference", "DoraLinearFunction"]
