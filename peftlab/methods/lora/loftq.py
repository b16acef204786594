"""LoftQ initialisation (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
Algorithm 1): fit the quantised base Q and the LoRA pair together, so that the model starts close to the
full-precision one instead of at the quantised one.

For a weight W (out, in), rank r, T = loftq_iter alternating steps, q_N the NF4 quantise-dequantise round trip:

    A_0 B_0 = 0
    for t = 1..T:
        Q_t = q_N(W - s B_{t-1} A_{t-1})                      quantise what the adapter does not carry
        U S V^T = SVD(W - Q_t)                                the quantisation error
        s B_t = U_r sqrt(S_r),   A_t = sqrt(S_r) V_r^T        its best rank-r approximation (Eckart-Young)

and the layer starts as Q_T + s B_T A_T. With T = 1 this is "quantise, then fit the error"; each further step
re-quantises the part of W the adapter does not carry. The paper's objective ||W - Q - s B A||_F is recorded per
step (`LoftQResult.errors`); at t = 1 it is already <= ||W - Q_1||_F, plain QLoRA's start (B = 0).

The scaling s = lora_alpha / r is folded into the pair evenly (A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s)), so that
the adapter's contribution s B A is the fitted error whatever alpha is. HF PEFT (`peft.utils.loftq_utils.loftq_init`)
sets A = sqrt(S_r) V_r^T and B = U_r sqrt(S_r) without s: the two agree when lora_alpha = r (s = 1) and PEFT's start
is off by the factor s otherwise.

Quantiser: NF4 from peftlab/kernels/nf4.py (the same codes as bitsandbytes'), on the weight in its stored layout
(transformers' Conv1D: (in, out)), with the QLoRA config's blocksize and double quantisation where the config has
them (QLoraConfig), else PEFT's LoftQ setting (blocksize 64, no double quantisation). Only 4 bits are implemented
(PEFT also offers bitsandbytes' 8-bit rows).

What the base becomes: on a plain LoRA layer the float weight is replaced by Q_T dequantised (as PEFT does; save that
base next to the adapter, the adapter file does not hold it). On a QLoRA layer the 4-bit base is Q_T itself: the
packed codes are handed to the layer (`nf4_init`), and QLoraLinear builds its NF4 base from them instead of quantising
the weight again (re-quantising Q_T's dequantised values is not exact with double quantisation: the second-level
scales are centred on their mean, which moves).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ...kernels.nf4 import NF4State, dequantize_nf4, quantize_nf4

# PEFT's LoftQ quantises with bitsandbytes' Params4bit defaults: blocks of 64, compress_statistics=False.
PEFT_BLOCKSIZE, PEFT_DOUBLE_QUANT = 64, False


@dataclass
class LoftQResult:
    q_weight: torch.Tensor
    """Q_T dequantised, (out, in) fp32."""
    packed: torch.Tensor
    """Q_T's packed NF4 codes (in the stored layout the quantiser was given)."""
    state: NF4State
    """Q_T's scales."""
    L: torch.Tensor
    """U_r sqrt(S_r), (out, r): s B A = L R."""
    R: torch.Tensor
    """sqrt(S_r) V_r^T, (r, in)."""
    errors: list[float]
    """||W - Q_t - L_t R_t||_F after each step t = 1..T."""


@torch.no_grad()
def loftq_decompose(W: torch.Tensor, rank: int, num_iter: int = 1, blocksize: int = PEFT_BLOCKSIZE,
                    double_quant: bool = PEFT_DOUBLE_QUANT, transposed: bool = False) -> LoftQResult:
    """Algorithm 1 on W (out, in) (module docstring). `transposed`: quantise W^T, the stored layout of a Conv1D
    weight, so that the codes are the ones its NF4 base holds."""
    if num_iter < 1:
        raise ValueError(f"LoftQ needs at least one alternating step; got loftq_iter={num_iter}.")
    W = W.to(torch.float32)
    target = W
    errors = []
    for _ in range(num_iter):
        stored = target.T if transposed else target
        packed, state = quantize_nf4(stored.contiguous(), blocksize, double_quant)
        Q = dequantize_nf4(packed, state, torch.float32)
        Q = Q.T if transposed else Q
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        root = torch.sqrt(S[:rank])
        L, R = U[:, :rank] * root[None, :], root[:, None] * Vh[:rank]
        errors.append(float(torch.linalg.matrix_norm(W - Q - L @ R)))
        target = W - L @ R
    return LoftQResult(Q, packed, state, L, R, errors)


def loftq_init(layer, name: str, config) -> None:
    """The "loftq" row of INITIALIZERS: A, B from Algorithm 1, base weight <- Q_T (module docstring)."""
    options = config.loftq_config
    weight = layer.base_layer.weight
    if getattr(layer, "is_embedding", False) or weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(
            f"init_lora_weights='loftq' fits A, B to the quantisation error of a full-precision Linear-like weight, "
            f"but this target is a {type(layer.base_layer).__name__} holding a {weight.dtype} weight of shape "
            f"{tuple(weight.shape)}. Target linear layers only, and load the base in full precision (LoftQ chooses "
            "the 4-bit weights itself: with QLoRA and `peftlab train`, the base is then quantised by LoftQ, not at "
            "load).")
    r, s = layer.r[name], layer.scaling[name]
    transposed = bool(getattr(layer, "fan_in_fan_out", False))
    matrix = weight.detach().to(torch.float32)
    matrix = matrix.T if transposed else matrix
    if r > min(matrix.shape):
        raise ValueError(f"init_lora_weights='loftq' takes r={r} directions from a {tuple(matrix.shape)} weight, "
                         f"which has at most {min(matrix.shape)}. Lower r, or set this module's rank with "
                         "rank_pattern.")
    result = loftq_decompose(matrix, r, options["loftq_iter"],
                             getattr(config, "bnb_4bit_blocksize", PEFT_BLOCKSIZE),
                             getattr(config, "bnb_4bit_use_double_quant", PEFT_DOUBLE_QUANT), transposed)
    A, B = layer.lora_pair(name)
    A.copy_(result.R / math.sqrt(s))  # s B A = L R
    B.copy_(result.L / math.sqrt(s))
    q = result.q_weight.T if transposed else result.q_weight
    weight.data.copy_(q.to(weight.dtype))
    if hasattr(type(layer), "quantised_base"):
        # A QLoRA layer (qlora/layer.py) builds its 4-bit base from these codes, standing for a weight of the base's
        # dtype (what unload and merge give back), as if quantised from it.
        layer.nf4_init = (result.packed, dataclasses.replace(result.state, dtype=weight.dtype))
