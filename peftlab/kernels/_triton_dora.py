"""Triton kernels of the DoRA fast path that are not GEMMs with an epilogue (those are `_triton_gemm.gemm_lowrank`).
Imported only by `dora_linear` when the Triton backend runs, so `import peftlab` never imports triton.

- `dora_norm`: n_o = sqrt(max(0, ||W_o||^2 + 2 s <B_o, (W A^T)_o> + s^2 B_o G B_o^T)), G = A A^T (r, r), one program
  per BM rows of W: it streams its rows once, accumulating ||W_o||^2 and the (BM, r) block of W A^T from the same
  loaded tile, then combines them with B and G. W (out, in) is read once, in its own dtype; nothing of size (out, in)
  is written.
- `dora_grad_prep`: one pass over dy and the saved output y (N, out): dz = c * dy (c = m / n, written in dy's
  dtype, the "dy" of the LoRA linear inside), t_o = sum_n dy_no (y_no - b_o) and, when the bias trains,
  db_o = sum_n dy_no (both fp32, accumulated per program over a block of rows, then one atomic add per column).

Everything is accumulated in fp32; W A^T and B G use input_precision="ieee" (not tf32) so that the norm keeps fp32
precision. Tiles are small under TRITON_INTERPRET=1 (CPU tests run each program in numpy).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, g_ptr, n_ptr,
    OUT, IN, R, s,
    swo, swi, sar, sai, sbo, sbr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)  # (BM,) rows of W = output units
    rr = tl.arange(0, BR)
    rk = tl.arange(0, BK)
    sq = tl.zeros((BM,), dtype=tl.float32)  # ||W_o||^2
    wa = tl.zeros((BM, BR), dtype=tl.float32)  # (W A^T)[rm, :]
    for k0 in range(0, IN, BK):
        kk = k0 + rk
        w = tl.load(w_ptr + rm[:, None] * swo + kk[None, :] * swi, mask=(rm[:, None] < OUT) & (kk[None, :] < IN),
                    other=0.0).to(tl.float32)  # (BM, BK)
        at = tl.load(a_ptr + rr[None, :] * sar + kk[:, None] * sai, mask=(rr[None, :] < R) & (kk[:, None] < IN),
                     other=0.0).to(tl.float32)  # (BK, BR) = A^T tile
        sq += tl.sum(w * w, axis=1)
        wa = tl.dot(w, at, wa, input_precision="ieee")
    bo = tl.load(b_ptr + rm[:, None] * sbo + rr[None, :] * sbr, mask=(rm[:, None] < OUT) & (rr[None, :] < R),
                 other=0.0).to(tl.float32)  # (BM, BR) rows of B
    g = tl.load(g_ptr + rr[:, None] * R + rr[None, :], mask=(rr[:, None] < R) & (rr[None, :] < R), other=0.0)
    bg = tl.dot(bo, g, input_precision="ieee")  # (BM, BR) = B G
    n2 = sq + (2.0 * s) * tl.sum(bo * wa, axis=1) + (s * s) * tl.sum(bg * bo, axis=1)
    tl.store(n_ptr + rm, tl.sqrt_rn(tl.maximum(n2, 0.0)), mask=rm < OUT)


def dora_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, G: torch.Tensor, s: float) -> torch.Tensor:
    """n (out,) fp32 from W (out, in), A (r, in), B (out, r) and G = A A^T ((r, r) fp32, contiguous)."""
    out_f, in_f = W.shape
    r = A.shape[0]
    if r > 256:
        raise ValueError(f"dora_norm: rank {r} > 256 does not fit one tile; use the torch backend.")
    n = torch.empty(out_f, device=W.device, dtype=torch.float32)
    BM, BK = (16, 32) if INTERPRET else (32, 64)  # 32 rows a program: 16 programs even for k/v_proj (out 512)
    BR = max(16, triton.next_power_of_2(r))
    _dora_norm_kernel[(triton.cdiv(out_f, BM),)](
        W, A, B, G, n, out_f, in_f, r, float(s),
        W.stride(0), W.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        BM=BM, BK=BK, BR=BR, num_warps=4,
    )
    return n


@triton.jit
def _dora_grad_prep_kernel(
    dy_ptr, y_ptr, c_ptr, bias_ptr, dz_ptr, t_ptr, db_ptr,
    N, OUT, ROWS,
    sdn, sdo, syn, syo, szn, szo,
    HAS_BIAS: tl.constexpr, WANT_DB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    ro = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,) output columns
    omask = ro < OUT
    c = tl.load(c_ptr + ro, mask=omask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ro, mask=omask, other=0.0).to(tl.float32)
    t = tl.zeros((BN,), dtype=tl.float32)
    db = tl.zeros((BN,), dtype=tl.float32)
    start = tl.program_id(0) * ROWS
    for r0 in range(start, start + ROWS, BM):  # this program's ROWS rows (masked past N)
        rn = r0 + tl.arange(0, BM)
        mask = (rn[:, None] < N) & omask[None, :]
        dy = tl.load(dy_ptr + rn[:, None] * sdn + ro[None, :] * sdo, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rn[:, None] * syn + ro[None, :] * syo, mask=mask, other=0.0).to(tl.float32)
        tl.store(dz_ptr + rn[:, None] * szn + ro[None, :] * szo, (dy * c[None, :]).to(dz_ptr.dtype.element_ty),
                 mask=mask)
        if HAS_BIAS:
            y = y - bias[None, :]  # masked entries have dy = 0: they add nothing
        t += tl.sum(dy * y, axis=0)
        if WANT_DB:
            db += tl.sum(dy, axis=0)
    tl.atomic_add(t_ptr + ro, t, mask=omask)
    if WANT_DB:
        tl.atomic_add(db_ptr + ro, db, mask=omask)


def dora_grad_prep(dy: torch.Tensor, y: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, want_db: bool):
    """(dz (N, out) in dy's dtype, t (out,) fp32, db (out,) fp32 or None) for dy, y (N, out), c (out,) fp32."""
    N, out_f = dy.shape
    dz = torch.empty_like(dy)
    t = torch.zeros(out_f, device=dy.device, dtype=torch.float32)
    db = torch.zeros(out_f, device=dy.device, dtype=torch.float32) if want_db else None
    if INTERPRET:
        BM, BN, ROWS = 16, 32, 32
    else:
        BM, BN, ROWS = 32, 128, 256  # 16k tokens: 64 row blocks x out / 128 column blocks, 64 atomics per column
    grid = (triton.cdiv(N, ROWS), triton.cdiv(out_f, BN))
    _dora_grad_prep_kernel[grid](
        dy, y, c, bias if bias is not None else c, dz, t, db if db is not None else t,
        N, out_f, ROWS,
        dy.stride(0), dy.stride(1), y.stride(0), y.stride(1), dz.stride(0), dz.stride(1),
        HAS_BIAS=bias is not None, WANT_DB=want_db, BM=BM, BN=BN, num_warps=4,
    )
    return dz, t, db
