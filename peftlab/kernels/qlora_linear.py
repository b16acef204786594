"""The QLoRA linear as one autograd node: LoRA on a frozen NF4 weight that is dequantised just before each GEMM.

Math: lora_linear.py's, with the frozen W = W_hat = dequantize(NF4 codes, scales) (out, in) (nf4.py), without
dropout mask or with one:

    forward   W_hat = dequant(codes) in the compute dtype     transient: dropped right after the base GEMM
              u = x_d A^T (N, r);  y = x W_hat^T + b + s u B^T
    backward  W_hat = dequant(codes) again                    only when dx is needed; dropped after the dx GEMM
              dx = dy W_hat + s (dy B) A;  dA, dB, db as in lora_linear.py;  the codes get no gradient

It is `LoraLinearFunction` with its weight given as a callable (dtype -> W_hat), so every product, rounding and
gradient is the LoRA node's: what the node keeps for backward is x and u (plus the parameters A, B and the codes,
which exist anyway), never W_hat. That is QLoRA's memory saving: holding W_hat between the passes would bring back a
full-precision weight per layer.

Memory per token of one Llama-3.2-1B layer in bf16 (hidden 2048, MLP 8192, r = 16 on q, k, v, o, gate, up, down):
this node keeps its input x, a tensor q/k/v share (and gate/up): 2048 + 2048 + 2048 + 8192 bf16 values = 28 KiB, plus
u, 7 x 16 fp32 = 448 B. The plain QLoRA path (QLoraLinear's forward without the switch; HF PEFT on bitsandbytes
alike) keeps each adapter's own fp32 copy of its input for A's matmul instead: (6 x 2048 + 8192) x 4 B = 80 KiB, plus
the same 448 B. W_hat is never kept by either; it exists once at a time, the largest (8192 x 2048 bf16) 32 MiB, during
its GEMM. The codes and scales of the layer's 60.8 M weights take 31.4 MB (0.516 B per weight) against 121.6 MB in bf16.

Extra cost against LoRA on a bf16 base: two dequantisations per layer and step (forward; backward when dx is
needed), each reading n/2 + n/64 bytes of codes and scale codes and writing 2n bytes of bf16 W_hat, which the GEMM
then reads as it would read a bf16 weight: ~2.5 n bytes of extra traffic each. For the 1B model's 973 M adapted
weights: 2 x 2.5 x 973 M = 4.9 GB per step, ~1.6 ms at 3 TB/s, against ~85 TFLOP of GEMMs and attention for a batch
of 8 x 2048 tokens (~0.2 s at 50 % of an H100's bf16 peak): ~1 %. (Estimates from the sizes; benchmarks/gpu_lora.py
measures the step, setups peftlab_qlora against peftlab.) At small batches the dequantisation's share grows, as the
GEMMs shrink and it does not.

Paths (`backend`, see backend.py):
- torch: `dequantize(dtype)` if given, else nf4.py's `dequantize_nf4`, then lora_linear's torch ops. QLoraLinear passes
  NF4Linear.dequantized_weight: nf4.py's reference, or bitsandbytes' kernel where the layer picks it, which it does only
  where bitsandbytes reproduces the reference bit for bit (methods/qlora/bnb.py), so the results are the same.
- triton: nf4_dequant.py's kernel (codes -> compute dtype in one pass, bit-exact to the reference) then
  `_triton_gemm.gemm_lowrank` with the low-rank term in its epilogue.

Autocast: as `fused_lora_linear`: under torch.autocast the base GEMM runs in the autocast dtype (W_hat is dequantised
straight to it), the rank-r path in the adapter's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

from .backend import resolve
from .lora_linear import LoraLinearFunction, autocast_inputs, lora_linear_reference
from .nf4 import dequantize_nf4


def qlora_linear_reference(x: torch.Tensor, packed: torch.Tensor, state, b: torch.Tensor | None, A: torch.Tensor,
                           B: torch.Tensor, scaling: float, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain autograd over nf4.py's dequantisation (in x's dtype) -> `lora_linear_reference`: the oracle."""
    W = dequantize_nf4(packed, state, x.dtype)
    return lora_linear_reference(x, W, b, A, B, scaling, dropout_mask)


def nf4_dequantizer(packed: torch.Tensor, state, backend: str,
                    dequantize: Callable[[torch.dtype], torch.Tensor] | None = None):
    """The callable dtype -> W_hat (out, in) that the node calls, for a resolved backend ('torch' or 'triton')."""
    if backend == "triton":
        from .nf4_dequant import dequantize_nf4_triton  # imports triton: on first use only

        return lambda dtype: dequantize_nf4_triton(packed, state, dtype)
    if dequantize is not None:
        return dequantize
    return lambda dtype: dequantize_nf4(packed, state, dtype)


def fused_qlora_linear(x: torch.Tensor, packed: torch.Tensor, state, b: torch.Tensor | None, A: torch.Tensor,
                       B: torch.Tensor, scaling: float, dropout_mask: torch.Tensor | None = None, backend: str = "auto",
                       dequantize: Callable[[torch.dtype], torch.Tensor] | None = None) -> torch.Tensor:
    """The fused QLoRA linear: `qlora_linear_reference`'s result, W_hat dequantised in forward and again in backward.
    x (..., in); packed + state: nf4.py's NF4 storage of W (out, in); b (out,) or None, cast to x's dtype as
    NF4Linear does; A (r, in), B (out, r); dropout_mask, if given, x's shape. `dequantize`: optional callable
    dtype -> W_hat for the torch backend (see the module docstring)."""
    which = resolve(backend, x.device)
    shape = tuple(state.shape)
    in_features = x.shape[-1]
    if len(shape) != 2 or shape[1] != in_features or A.shape[1] != in_features or B.shape != (shape[0], A.shape[0]):
        raise ValueError(f"qlora_linear: shapes do not fit: x {tuple(x.shape)}, quantised W {shape}, A "
                         f"{tuple(A.shape)}, B {tuple(B.shape)} (want W (out, in), A (r, in), B (out, r)).")
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"qlora_linear: dropout_mask has shape {tuple(dropout_mask.shape)}, x has "
                         f"{tuple(x.shape)}; pass the mask of x itself (nn.Dropout's x * mask).")
    x, _, b, node_context = autocast_inputs(x, None, b)  # W_hat is dequantised straight to x's (autocast) dtype
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)  # NF4Linear.matmul's cast (differentiable: a trained bias still gets its gradient)
    make_W = nf4_dequantizer(packed, state, which, dequantize)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    mask2 = dropout_mask.reshape(-1, in_features) if dropout_mask is not None else None
    with node_context:
        y = LoraLinearFunction.apply(x2, make_W, b, A, B, float(scaling), mask2, which)
    return y.reshape(*lead, shape[0])


__all__ = ["fused_qlora_linear", "qlora_linear_reference", "nf4_dequantizer"]
