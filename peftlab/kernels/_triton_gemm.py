"""Triton kernels of the LoRA fast path. Imported only by `lora_linear` when a Triton backend was chosen, so
`import peftlab` never imports triton.

One kernel does every product the LoRA linear needs; what it computes is chosen by strides and flags:

    out (M, N) = X (M, K) @ Y (K, N)  [+ scale * L (M, R) @ Rt (R, N)]  [+ bias (N,)]
    (with col_scale c (N,): out = c * (X @ Y [+ scale * L @ Rt]) [+ bias], the DoRA factor m / n; dora_linear.py)

The bracketed low-rank term is the GEMM epilogue: after the K loop each (BM, BN) tile adds its slice of
scale * L @ Rt, one (BM, R) x (R, BN) dot with R = r <= 256, before the single store. So

    forward   y  = x W^T + s (x A^T) B^T + b     X = x, Y = W^T (a strided view), L = x A^T (N, r), Rt = B^T
    backward  dx = dy W + s (dy B) A             X = dy, Y = W, L = dy B (N, r), Rt = A

and the rank-r products (x A^T, dy B, dA = s (dy B)^T x, dB = s dy^T (x A^T)) are the same kernel without the
epilogue. The reductions over tokens (dA, dB: K = number of tokens, M or N = r) have few output tiles, so they split
K over a third grid axis and accumulate with atomic adds into an fp32 output (SPLIT_K > 1).

Precision: products accumulate in fp32. Two bf16/fp16 operands go to tl.dot as they are (tensor cores). Mixed
operands (bf16 activations with fp32 adapter weights) are both upcast to fp32, and fp32 dots use
input_precision="ieee" (not tf32) so that the rank-r path keeps the fp32 adapter weights' precision; those dots
are r / in of the base GEMM's work. Under TRITON_INTERPRET=1 (CPU tests) tl.dot on bf16 gives garbage (numpy has no
bf16; checked with triton 3.9), so the interpreter upcasts every operand to fp32: exact emulation, since a bf16 x
bf16 product is exact in fp32 and the accumulation is fp32 either way.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gemm_lowrank_kernel(
    x_ptr, y_ptr, l_ptr, r_ptr, bias_ptr, out_ptr, cs_ptr,
    M, N, K, R, scale,
    sxm, sxk, syk, syn, slm, slr, srr, srn, som, son,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    HAS_COLSCALE: tl.constexpr,
    SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_m = (M + BM - 1) // BM  # not tl.cdiv: a @jit helper, which breaks the interpreter if triton was imported before
    # TRITON_INTERPRET was set (its standard library is then compiled-mode)
    n_n = (N + BN - 1) // BN
    per_group = GROUP_M * n_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = pid_m * BM + tl.arange(0, BM)  # (BM,)
    rn = pid_n * BN + tl.arange(0, BN)  # (BN,)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # This program's share of K: tiles pid_k, pid_k + SPLIT_K, ...
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        kk = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        b = tl.load(y_ptr + kk[:, None] * syk + rn[None, :] * syn, mask=(kk[:, None] < K) & (rn[None, :] < N),
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    if HAS_LOWRANK:
        # Epilogue: acc += scale * L[rm, :] @ Rt[:, rn], in fp32 (L is the fp32 (M, r) intermediate).
        rr = tl.arange(0, BR)
        lo = tl.load(l_ptr + rm[:, None] * slm + rr[None, :] * slr, mask=(rm[:, None] < M) & (rr[None, :] < R),
                     other=0.0).to(tl.float32)
        ro = tl.load(r_ptr + rr[:, None] * srr + rn[None, :] * srn, mask=(rr[:, None] < R) & (rn[None, :] < N),
                     other=0.0).to(tl.float32)
        acc += scale * tl.dot(lo, ro, input_precision="ieee")
    if HAS_COLSCALE:  # per-output-column factor (fp32), before the bias: linear, so also right under SPLIT_K
        acc = acc * tl.load(cs_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]

    out_ptrs = out_ptr + rm[:, None] * som + rn[None, :] * son
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K > 1:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


def gemm_lowrank(x: torch.Tensor, y: torch.Tensor, *, low: torch.Tensor | None = None,
                 high: torch.Tensor | None = None, scale: float = 1.0, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ y (K, N) [+ scale * low (M, R) @ high (R, N)] [+ bias (N,)]; any strides (pass transposed views,
    nothing is copied). Output dtype `out_dtype` (default x's), accumulated in fp32. col_scale (N,), contiguous:
    multiplies column j of the product (low-rank term included, bias not) by col_scale[j]."""
    M, K = x.shape
    K2, N = y.shape
    if K2 != K:
        raise ValueError(f"gemm_lowrank: inner sizes differ, x is {tuple(x.shape)} and y is {tuple(y.shape)}.")
    out_dtype = out_dtype or x.dtype
    has_low = low is not None
    R = low.shape[1] if has_low else 1
    if has_low and (low.shape[0] != M or high.shape != (R, N)):
        raise ValueError(f"gemm_lowrank: low-rank factors {tuple(low.shape)} x {tuple(high.shape)} do not fit an "
                         f"({M}, {N}) output.")
    if R > 256:
        raise ValueError(f"gemm_lowrank: rank {R} > 256 does not fit one epilogue tile; use the torch backend.")
    # Tensor-core friendly tiles on a GPU; tiny tiles keep the CPU interpreter quick (it runs each program in numpy).
    if INTERPRET:
        BM, BN, BK = 16, 32, 32
    else:
        BM = 128 if M >= 128 else _pow2_at_least(M, 16)
        BN = 128 if N >= 128 else _pow2_at_least(N, 16)
        BK = 64 if K >= 64 else _pow2_at_least(K, 16)
    # Reductions over many tokens into few output tiles (dA: (r, in), dB: (out, r)): split K across programs.
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    split_k = 1
    if not has_low and bias is None and not INTERPRET:
        while tiles * split_k < 132 and K // (BK * split_k * 2) >= 8:  # 132 SMs on an H100 SXM
            split_k *= 2
    if INTERPRET and not has_low and bias is None and K >= 4 * BK:
        split_k = 2  # exercise the atomic path in the CPU tests
    upcast = INTERPRET or x.dtype != y.dtype or x.dtype == torch.float32
    ieee = upcast  # every fp32 dot: ieee
    if split_k > 1:
        out = torch.zeros((M, N), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((M, N), device=x.device, dtype=out_dtype)
    dummy = out
    grid = (tiles, split_k)
    _gemm_lowrank_kernel[grid](
        x, y, low if has_low else dummy, high if has_low else dummy, bias if bias is not None else dummy, out,
        col_scale if col_scale is not None else dummy,
        M, N, K, R, float(scale),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        low.stride(0) if has_low else 0, low.stride(1) if has_low else 0,
        high.stride(0) if has_low else 0, high.stride(1) if has_low else 0,
        out.stride(0), out.stride(1),
        HAS_LOWRANK=has_low, HAS_BIAS=bias is not None, UPCAST=upcast, IEEE=ieee, SPLIT_K=split_k,
        HAS_COLSCALE=col_scale is not None,
        BM=BM, BN=BN, BK=BK, BR=_pow2_at_least(R, 16), GROUP_M=8,
        num_warps=8 if BM * BN >= 128 * 128 else 4, num_stages=3,
    )
    return out if out.dtype == out_dtype else out.to(out_dtype)
