"""NF4 dequantisation in one Triton pass: packed 4-bit codes + (double-quantised) block scales -> W_hat in the compute
dtype. The format and the reference are nf4.py beside it (`dequantize_nf4`); the value tables (NF4_CODE,
DYNAMIC_CODE) are read from there and handed to the kernel as tensors. Imported only when a Triton path runs (it
imports triton), by kernels/qlora_linear.py.

Per element i of the flattened weight (n elements, first-level blocks of `blocksize`, second-level of `dq_blocksize`):

    byte   = packed[i // 2]                      element 2k in the high nibble, 2k+1 in the low one (bitsandbytes)
    q      = byte >> 4  if i is even  else  byte & 15
    b      = i // blocksize
    c_hat  = DYN[absmax[b]] * d[b // dq_blocksize] + mu      (double quantisation: two fp32 roundings, in this order)
           = absmax[b]                                        (without: the fp32 scale itself)
    W_hat_i = NF4[q] * c_hat                                  one fp32 rounding, then one cast to the output dtype

Numerics (what the tests check): fp32 output is bit for bit the reference's, because the kernel performs the same fp32
operations in the same order as `dequantize_nf4` (table lookups are exact; DYN[e] * d, + mu and NF4[q] * c_hat are each
one IEEE-rounded fp32 operation). That requires the multiply-add in c_hat NOT to be contracted into an FMA (one
rounding instead of two), which the CUDA backend does by default: the kernel is launched with
enable_fp_fusion=False. bf16 / fp16 output equals the reference's fp32 result cast once (round to nearest even, what
torch's .to() does): the reference itself computes in fp32 and casts once, so the two agree bit for bit as well.
Under TRITON_INTERPRET=1 (CPU tests) the interpreter's fp32 -> bf16 cast truncates instead of rounding (triton 3.9),
so there the kernel writes fp32 and torch casts it to bf16 once: the same numbers as the GPU's in-kernel cast.

Work layout: one program takes ROWS whole first-level blocks, a (ROWS, next_pow2(blocksize)) tile, so each block's
scale is computed once per row and broadcast along it. Any positive blocksize works (columns past it are masked);
QLoRA's is 64, bitsandbytes allows powers of two from 32 to 4096. Memory traffic per weight: 1/2 byte of code, 1/64
of a scale code (double quantisation) and the 2-byte (bf16) or 4-byte (fp32) output: the kernel is bandwidth-bound,
~2.6 bytes per weight for bf16, 4.2 M weights of an 8192 x 512 matrix in ~4 us at 3 TB/s (an estimate, not measured).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .nf4 import DYNAMIC_CODE, NF4_CODE, NF4State

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=False)
"""Compile options of every launch: no FMA contraction, so that DYN[e] * d + mu rounds twice, as the reference does
(tests/test_kernels_qlora.py compiles the kernel for sm_90 with them and checks the PTX)."""


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dyn_ptr, out_ptr,
    n, n_blocks, blocksize, dq_blocksize,
    DOUBLE: tl.constexpr, ROWS: tl.constexpr, BS: tl.constexpr, WIDE: tl.constexpr,
):
    pid = tl.program_id(0)
    if WIDE:  # n >= 2^31: int64 element indices
        pid = pid.to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) first-level block indices
    cols = tl.arange(0, BS)  # (BS,) position inside the block
    row_ok = rows < n_blocks
    # The block's scale c_hat, in fp32: one value per row.
    if DOUBLE:
        code8 = tl.load(absmax_ptr + rows, mask=row_ok, other=0).to(tl.int32)  # uint8 e_b
        dyn = tl.load(dyn_ptr + code8, mask=row_ok, other=0.0)  # DYN[e_b]
        d = tl.load(absmax2_ptr + rows // dq_blocksize, mask=row_ok, other=0.0)  # d_k
        mu = tl.load(offset_ptr)
        scale = dyn * d  # rounded to fp32 here, then + mu rounded again: the reference's two operations (no FMA)
        scale = scale + mu
    else:
        scale = tl.load(absmax_ptr + rows, mask=row_ok, other=0.0)
    idx = rows[:, None] * blocksize + cols[None, :]  # (ROWS, BS) flat element index
    ok = row_ok[:, None] & (cols[None, :] < blocksize) & (idx < n)
    byte = tl.load(packed_ptr + idx // 2, mask=ok, other=0)  # uint8; the two elements of a byte read it twice (cached)
    code = tl.where((idx % 2) == 0, byte >> 4, byte & 15).to(tl.int32)
    value = tl.load(nf4_ptr + code, mask=ok, other=0.0)  # NF4[q], fp32
    w = value * scale[:, None]
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=ok)


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """nf4.py's NF4_CODE (16,) and DYNAMIC_CODE (256,) fp32 on `device`, copied there once."""
    if device not in _TABLES:
        _TABLES[device] = (NF4_CODE.to(device), DYNAMIC_CODE.to(device))
    return _TABLES[device]


def dequantize_nf4_triton(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`nf4.dequantize_nf4(packed, state, dtype)` in one Triton kernel: W_hat of shape state.shape in `dtype` (default
    the original dtype; fp32, bf16 or fp16). packed (ceil(n/2),) uint8 on a CUDA device (CPU under
    TRITON_INTERPRET=1)."""
    dtype = dtype or state.dtype
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize_nf4_triton writes fp32, bf16 or fp16, not {dtype}; use "
                         "peftlab.kernels.nf4.dequantize_nf4 for other dtypes.")
    n = state.numel
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_nf4_triton: packed codes must be uint8 with ceil(n/2) = {(n + 1) // 2} bytes for "
                         f"a weight of shape {tuple(state.shape)}; got {packed.dtype} with {packed.numel()} elements.")
    n_blocks = -(-n // state.blocksize)
    if state.absmax.numel() != n_blocks:
        raise ValueError(f"dequantize_nf4_triton: {state.absmax.numel()} block scales for {n_blocks} blocks of "
                         f"{state.blocksize} (shape {tuple(state.shape)}); the state does not belong to these codes.")
    device = packed.device
    nf4, dyn = _tables(device)
    packed = packed.reshape(-1).contiguous()
    absmax = state.absmax.contiguous()
    if state.double_quant:
        absmax2, offset = state.absmax_scale.contiguous(), state.offset.contiguous()
    else:
        absmax = absmax.to(torch.float32)
        absmax2 = offset = absmax  # unused (DOUBLE=False); any valid pointer
    # The interpreter's fp32 -> bf16 cast truncates (see the module docstring): write fp32 there, cast once in torch.
    kernel_dtype = torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype
    out = torch.empty(state.shape, device=device, dtype=kernel_dtype)
    bs = triton.next_power_of_2(state.blocksize)
    rows = max(1, 2048 // bs)  # ~2048 elements per program: 32 blocks of 64
    grid = (triton.cdiv(n_blocks, rows),)
    _nf4_dequant_kernel[grid](
        packed, absmax, absmax2, offset, nf4, dyn, out,
        n, n_blocks, state.blocksize, state.dq_blocksize,
        DOUBLE=state.double_quant, ROWS=rows, BS=bs, WIDE=n + bs >= 2 ** 31, **LAUNCH_OPTIONS,
    )
    return out if out.dtype == dtype else out.to(dtype)


__all__ = ["dequantize_nf4_triton"]
