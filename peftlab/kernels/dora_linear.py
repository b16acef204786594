"""The DoRA linear layer as one autograd node: reference, torch path and Triton path.

Math, for x (N, in) (leading dims flattened), frozen W (out, in) and bias b (out,), adapter A (r, in), B (out, r),
scaling s and magnitude m (out,) (see peftlab/methods/dora/layer.py):

    n   = ||W + s B A||_row             (out,)    a constant for autograd (DoRA sec. 4.3, PEFT, our layer)
    c   = m / n                         (out,)    fp32
    u   = x A^T                         (N, r)    computed once, kept for backward
    z   = x W^T + s u B^T               (N, out)  never stored
    y   = c * z + b                     (N, out)  the DoRA layer's output (its PEFT form rearranged:
                                                  result + (c - 1)(result - b) + c s u B^T, result = x W^T + b)

Backward, with dz = c * dy (the incoming gradient seen through the per-column factor):

    dx  = dz W + s (dz B) A             the LoRA linear's backward with dy -> dz (lora_linear.py, reused)
    dA  = s (dz B)^T x,   dB = s dz^T u  computed as dz B = dy (c B) and dz^T u = c (dy^T u): from dy, exact in the
                                         adapter's dtype (fp32), as the reference's are
    dm  = (1 / n) * sum_n dy * z        = sum_n dy * (y - b) / (c n)   (z recovered from the saved output)
    db  = sum_n dy                      only when b trains; dW = dz^T x only when W trains (not DoRA)

The norm without W + s B A. Per output unit o,

    n_o^2 = ||W_o||^2 + 2 s <B_o, (W A^T)_o> + s^2 B_o (A A^T) B_o^T

W A^T is one (out, r) product, A A^T (r, r). `dora_weight_norm` computes this every forward; nothing of size
(out, in) is built (the plain layer builds W.float(), B A, s B A and their sum: four (out, in) fp32 temporaries).
||W_o||^2 is computed in the same pass over W as W A^T (Triton: one kernel reads W once, `_triton_dora.dora_norm`;
torch: over row blocks of at most 4M values, upcast to fp32 one block at a time), not cached: peftlab rewrites base
weights through `weight.data` (merge/unmerge, PiSSA/OLoRA init, Delta-LoRA), which leaves `weight._version` as it
was, so a cache keyed by data_ptr + _version would serve a stale norm after a PiSSA adapter is added or an adapter is
merged and unmerged (tests/test_kernels_dora.py rewrites W that way and checks the next forward). The pass costs one
read of W: 2 B per weight in bf16, about 2 GB per forward for Llama-3.2-1B (~0.7 ms of an H100's bandwidth; not
measured yet: benchmarks/gpu_lora.py --setups peftlab,peftlab_dora).

Numerics of the formula: everything in fp32 (W is upcast as it is read; A, B are fp32 adapters). The three terms
are each accurate to a few fp32 ulps of their own size, so the error of n^2 is a few 2^-24 (||W_o||^2 + 2 s
|<B_o, (W A^T)_o>| + s^2 B_o G B_o^T): when the update cancels W, n's relative error grows like 2^-23 ||W_o||^2 /
n_o^2, where the direct norm of W + s B A loses only ~2^-23 ||W_o|| / n_o. In DoRA the update is small next to W
(m starts at ||W||; n / ||W|| stays near 1), where both are a few ulps; at n = 0.1 ||W|| the formula is still within
a few 1e-5 relative, at n = 0.01 ||W|| within ~1e-3 (the first is tested). Rounding can make n^2 slightly negative
when W + s B A is (nearly) 0: it is clamped at 0 before the sqrt.

What backward keeps (ctx), and why:
- x: the base GEMM's input, needed for dA (and kept by the plain path's base linear anyway); u (N, r) for dB.
- y, the node's own output, to recover z = (y - b) / c for dm. The alternatives: keep z (the same size, but no
  other node holds it) or recompute z in backward (one more x W^T: the frozen GEMM work of every adapted linear
  goes from 2 to 3 per step, against the issue's 1.15x target over LoRA). Saving y shares storage with whatever
  else saves it: in a Llama MLP the SiLU keeps the gate_proj output and the product keeps the up_proj output.
  Per token of one Llama-3.2-1B layer (DoRA r=16 on q, k, v, o, gate, up, down; outputs 2048 + 512 + 512 + 2048 +
  8192 + 8192 + 2048 = 23552 values), bf16: y is 46 KiB, of which 32 KiB (gate, up) is kept anyway, so 14 KiB
  extra; keeping z would be 46 KiB; the plain layer (PEFT's form under autograd) keeps 218 KiB: fp32 copies of x
  (80 KiB), the fp32 low-rank output s u B^T that c multiplies (92 KiB) and the base output that (c - 1) multiplies
  (46 KiB). At 8 x 2048 tokens and 16 layers: 3.5 GiB (y), 11.5 GiB (z), 54.5 GiB (plain), 0 with recomputation.
  z from y: y is rounded to its dtype (2^-9 relative in bf16), so each term of dm carries that rounding, the same
  size as the reference's own rounding of the base output; with a bias much larger than c z, y - b cancels and dm
  loses accuracy in proportion to |b| / |c z|. Where m_o = 0 exactly (c_o = 0, y_o = b_o), z_o is recomputed
  from x and W_o (a GEMM over those columns only).
- c and n (out,) each; W, A, B, m, b are the parameters themselves (no copies).
Transient in backward: dz (N, out) in dy's dtype, made in one pass together with dm's and db's column sums.

Paths (`backend`, see backend.py):
- torch: torch ops; the norm and the column sums over row blocks of fp32; the forward computes z in fp32 and
  rounds y once.
- triton: `_triton_dora.dora_norm` for n; `_triton_gemm.gemm_lowrank` with s u B^T, the column scale c and b in its
  epilogue for y (the (N, out) low-rank term and z never exist in memory); `_triton_dora.dora_grad_prep` for dz,
  dm's sums and db in one pass; the LoRA kernels for dx (s (dz B) A in the epilogue), dA and dB.

Autocast: as `fused_lora_linear`: x, W, b are cast to the autocast dtype, the node runs with autocast off; n is
computed from W as stored (the plain layer takes its norm from the stored weight too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import resolve
from .lora_linear import OPS as LORA_OPS, autocast_inputs

BLOCK_VALUES = 1 << 22
"""Row blocks of the torch path hold at most this many fp32 values (16 MiB) at a time."""


# ---- references (plain autograd; the oracles) ----------------------------------------------------------------

def dora_weight_norm_reference(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A||_row as the DoRA layer computes it (W + s B A built in the adapter's dtype), without gradient."""
    with torch.no_grad():
        update = B @ A
        return torch.linalg.norm(W.to(update.dtype) + scaling * update, dim=1)


def dora_linear_reference(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor,
                          B: torch.Tensor, m: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoraLinear's forward (one live adapter, no dropout) written out with plain autograd: PEFT's form
    result + (m/n - 1) (result - b) + (m/n) s B A x with n detached."""
    result = F.linear(x, W, b)
    h = x.to(A.dtype)
    scale = m / dora_weight_norm_reference(W, A, B, scaling)
    base = result if b is None else result - b
    return (result + ((scale - 1) * base + scale * F.linear(F.linear(h, A), B) * scaling)).to(result.dtype)


# ---- the norm ------------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm_torch(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    acc = _acc_dtype(W.dtype)
    out_f, in_f = W.shape
    Af, Bf = A.to(acc), B.to(acc)
    wsq = torch.empty(out_f, device=W.device, dtype=acc)  # ||W_o||^2
    wa = torch.empty(out_f, A.shape[0], device=W.device, dtype=acc)  # W A^T
    rows = out_f if W.dtype == acc else max(1, BLOCK_VALUES // in_f)  # no copy at all when W is already fp32
    for i in range(0, out_f, rows):
        Wc = W[i:i + rows].to(acc)
        wsq[i:i + rows] = torch.linalg.vecdot(Wc, Wc, dim=1)
        torch.matmul(Wc, Af.T, out=wa[i:i + rows])
    G = Af @ Af.T  # (r, r)
    n2 = wsq + (2.0 * s) * torch.linalg.vecdot(Bf, wa, dim=1) + (s * s) * torch.linalg.vecdot(Bf @ G, Bf, dim=1)
    return n2.clamp_min_(0.0).sqrt_()  # rounding can push n^2 of a (near) zero row below 0


def _norm_triton(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    from ._triton_dora import dora_norm  # triton imported here, on first use only

    Af = A.to(torch.float32)
    return dora_norm(W, A, B, (Af @ Af.T).contiguous(), s)


def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                     backend: str = "auto") -> torch.Tensor:
    """n = ||W + s B A||_row (out,) in fp32 (fp64 for an fp64 W) from ||W_o||^2, W A^T and A A^T (module docstring),
    without building W + s B A; no gradient."""
    if W.dim() != 2 or A.dim() != 2 or B.shape != (W.shape[0], A.shape[0]) or A.shape[1] != W.shape[1]:
        raise ValueError(f"dora_weight_norm: shapes do not fit: W {tuple(W.shape)}, A {tuple(A.shape)}, B "
                         f"{tuple(B.shape)} (want W (out, in), A (r, in), B (out, r)).")
    which = resolve(backend, W.device)
    with torch.no_grad():
        W, A, B = W.detach(), A.detach(), B.detach()
        if which == "triton" and W.dtype != torch.float64:
            return _norm_triton(W, A, B, float(scaling))
        return _norm_torch(W, A, B, float(scaling))


# ---- backward's one pass over dy and y, per backend -----------------------------------------------------------

def _grad_prep_torch(dy, y, c, b, want_db):
    """dz = c * dy (dy's dtype), t = sum_n dy (y - b), db = sum_n dy (fp32 sums), over row blocks."""
    N, out_f = dy.shape
    acc = _acc_dtype(dy.dtype)
    dz = torch.empty_like(dy)
    t = torch.zeros(out_f, device=dy.device, dtype=acc)
    db = torch.zeros(out_f, device=dy.device, dtype=acc) if want_db else None
    bf = b.to(acc) if b is not None else None
    rows = max(1, BLOCK_VALUES // out_f)
    for i in range(0, N, rows):
        d = dy[i:i + rows].to(acc)
        dz[i:i + rows] = d * c
        yy = y[i:i + rows].to(acc)
        if bf is not None:
            yy = yy - bf
        t += (d * yy).sum(0)
        if db is not None:
            db += d.sum(0)
    return dz, t, db


def _grad_prep_triton(dy, y, c, b, want_db):
    from ._triton_dora import dora_grad_prep

    return dora_grad_prep(dy, y, c, b, want_db)


class _AnyZero:
    """Whether c has an exact 0 (a magnitude m_o = 0), asked in forward and read in backward without stalling a GPU:
    on CUDA the answer is copied to pinned host memory asynchronously and an event marks it; by the time backward
    reads it the forward has long run, so waiting on the event costs nothing (a plain `.any()` in backward would
    drain the stream in every layer)."""

    def __init__(self, c: torch.Tensor) -> None:
        if c.is_cuda:
            self.flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.flag.copy_((c == 0).any(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.flag, self.event = bool((c == 0).any()), None

    def get(self) -> bool:
        if self.event is None:
            return self.flag
        self.event.synchronize()
        return bool(self.flag)


# ---- the node ---------------------------------------------------------------------------------------------------

class DoraLinearFunction(torch.autograd.Function):
    """One node for y = (m / n) * (x W^T + s (x A^T) B^T) + b, n given (a constant); 2-D x. Saves x, u = x A^T
    (N, r), the output y, c = m / n and n (module docstring)."""

    @staticmethod
    def forward(ctx, x, W, b, A, B, m, n, scaling, backend):
        c = m.detach().to(n.dtype) / n  # (out,) fp32
        s = scaling
        if backend == "triton":
            from ._triton_gemm import gemm_lowrank

            u = gemm_lowrank(x, A.T, out_dtype=A.dtype)  # (N, r)
            # c * (x W^T + s u B^T) + b in the epilogue of the base GEMM: z is never stored.
            y = gemm_lowrank(x, W.T, low=u, high=B.T, scale=s, bias=b, col_scale=c.to(torch.float32).contiguous(),
                             out_dtype=x.dtype)
        else:
            u = F.linear(x.to(A.dtype), A)  # (N, r) in A's dtype
            acc = _acc_dtype(x.dtype)
            z = F.linear(x, W).to(acc) + s * F.linear(u, B).to(acc)  # (N, out), transient
            y = (z.mul_(c.to(acc)) if b is None else torch.addcmul(b.to(acc), z, c.to(acc))).to(x.dtype)
        ctx.save_for_backward(x, W, b, A, B, m, u, y, c, n)
        ctx.scaling, ctx.backend = s, backend
        ctx.any_zero = _AnyZero(c) if ctx.needs_input_grad[5] else None  # only dm needs it
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W, b, A, B, m, u, y, c, n = ctx.saved_tensors
        ops, s = LORA_OPS[ctx.backend], ctx.scaling
        need_x, need_W, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        need_b = need_b and b is not None
        dy = dy.contiguous()
        prep = _grad_prep_triton if ctx.backend == "triton" else _grad_prep_torch
        dz, t, db = prep(dy, y, c.to(_acc_dtype(dy.dtype)).contiguous(), b, need_b)
        dx = dW = dA = dB = dm = None
        if need_m:
            denom = c * n  # = m up to one rounding: dm = sum dy z / n with z = (y - b) / c
            dm = t.to(denom.dtype) / denom
            if ctx.any_zero.get():  # m_o = 0: y_o = b_o holds no z_o; recompute those columns (rare: no hot path)
                dead = (c == 0).nonzero().squeeze(1)
                acc = _acc_dtype(x.dtype)
                Wd, Bd = W.index_select(0, dead).to(acc), B.index_select(0, dead).to(acc)
                z_dead = x.to(acc) @ Wd.T + s * (u.to(acc) @ Bd.T)  # (N, k)
                dm[dead] = ((dy.index_select(1, dead).to(acc) * z_dead).sum(0) / n[dead].to(acc)).to(dm.dtype)
            dm = dm.to(m.dtype)
        # dz B = dy (c B) and dz^T u = c (dy^T u): the adapter's gradients come from dy itself with c folded into
        # (out, r) factors, in the adapter's dtype, so they do not see dz's rounding to dy's dtype (only dx does).
        cB = c[:, None].to(B.dtype) * B  # (out, r)
        g = ops.low_rank_grad(dy, cB) if (need_x or need_A) else None  # dz B (N, r)
        if need_x:
            dx = ops.grad_input(dz, W, g, A, s, None, x.dtype)
        if need_A:
            dA = ops.grad_A(g, x, s).to(A.dtype)
        if need_B:
            dB = (ops.grad_B(dy, u, s) * c[:, None].to(u.dtype)).to(B.dtype)
        if need_W:  # not DoRA's case (W frozen); the norm stays a constant for W too, as in the plain layer
            dW = (dz.T @ x.to(dz.dtype)).to(W.dtype)
        if need_b:
            db = db.to(b.dtype)
        else:
            db = None
        return dx, dW, db, dA, dB, dm, None, None, None


def fused_dora_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                      m: torch.Tensor, scaling: float, backend: str = "auto") -> torch.Tensor:
    """The fused DoRA linear: `dora_linear_reference`'s result (one live adapter, no dropout), with the norm from
    `dora_weight_norm` and the backward described in the module docstring. x (..., in); returns (..., out)."""
    which = resolve(backend, x.device)
    in_f = x.shape[-1]
    out_f = W.shape[0]
    if (W.dim() != 2 or W.shape[1] != in_f or A.dim() != 2 or A.shape[1] != in_f
            or B.shape != (out_f, A.shape[0]) or m.shape != (out_f,)):
        raise ValueError(f"dora_linear: shapes do not fit: x {tuple(x.shape)}, W {tuple(W.shape)}, A "
                         f"{tuple(A.shape)}, B {tuple(B.shape)}, m {tuple(m.shape)} (want W (out, in), A (r, in), "
                         "B (out, r), m (out,)).")
    n = dora_weight_norm(W, A, B, scaling, backend=which)  # from W as stored, before any autocast cast
    lead = x.shape[:-1]
    x, W, b, node_context = autocast_inputs(x, W, b)
    x2 = x.reshape(-1, in_f)
    with node_context:
        y = DoraLinearFunction.apply(x2, W, b, A, B, m, n, float(scaling), which)
    return y.reshape(*lead, out_f)
