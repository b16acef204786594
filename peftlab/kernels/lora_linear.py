"""The LoRA linear layer as one autograd node: reference, torch path and Triton path.

Math, for x (N, in) (leading dims flattened), frozen W (out, in) and bias b (out,), adapter A (r, in), B (out, r),
scaling s and an optional dropout mask M (N, in) (already holding the 1 / (1 - p) factor, as nn.Dropout's output
x * M does):

    x_d = x * M                       (N, in)   (x_d = x without dropout)
    u   = x_d A^T                     (N, r)    computed once, kept for backward
    y   = x W^T + b + s u B^T         (N, out)

    g   = dy B                        (N, r)
    dx  = dy W + s (g A) * M          (N, in)
    dA  = s g^T x_d                   (r, in)
    dB  = s dy^T u                    (out, r)
    db  = sum_n dy                    (out,)    only when b trains; dW = dy^T x only when W trains (not LoRA)

Memory: the node keeps x (the same tensor the frozen base GEMM needs for dx anyway), u (N, r) and M if given.
Plain autograd over `base(x) + B(A(drop(x.to(fp32)))) * s` (LoraLinear's and HF PEFT's forward with fp32 adapter
weights on a bf16 base) also keeps each layer's own fp32 copy of x for A's matmul. Per token of one Llama-3.2-1B
layer (hidden 2048, MLP 8192, LoRA on q, k, v, o, gate, up, down): the base GEMMs keep 3 bf16 inputs of 2048 and
one of 8192 (q/k/v and gate/up share theirs) = 28 KiB; the fp32 copies add 6 x 2048 + 8192 values x 4 B = 80 KiB;
this node adds only u, 7 x r=16 x 4 B = 448 B.

Paths (`backend`, see backend.py):
- torch: the same products with torch ops; the forward rounds as `lora_linear_reference` does (bitwise equal).
- triton: `_triton_gemm.gemm_lowrank`: the base GEMM with s u B^T (forward) or s g A (backward) added in its
  epilogue, so the (N, out) / (N, in) low-rank terms never exist in memory; the rank-r products run in fp32.

Autocast: under torch.autocast the base GEMM runs in the autocast dtype (x, W, b are cast, as autocast would cast
them for F.linear) and the node itself runs with autocast off; the rank-r path stays in the adapter's dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .backend import resolve


def lora_linear_reference(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor,
                          B: torch.Tensor, scaling: float, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b + s ((x * M) A^T) B^T with plain autograd: LoraLinear's forward written out (the oracle)."""
    result = F.linear(x, W, b)
    h = x.to(A.dtype)
    if dropout_mask is not None:
        h = h * dropout_mask.to(A.dtype)
    return result + (F.linear(F.linear(h, A), B) * scaling).to(result.dtype)


# ---- the pieces, per backend -------------------------------------------------------------------------------

def _dropped(x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x_d in the adapter dtype: what the reference's A matmul reads (a transient, never saved)."""
    if mask is None:
        return x
    return x.to(dtype) * mask.to(dtype)


class _TorchOps:
    @staticmethod
    def forward(x, W, b, A, B, s, mask):
        xd = _dropped(x, mask, A.dtype).to(A.dtype)
        u = F.linear(xd, A)  # (N, r) in A's dtype
        y = F.linear(x, W, b)
        y = y + (F.linear(u, B) * s).to(y.dtype)
        return y, u

    @staticmethod
    def low_rank_grad(dy, B):
        return dy.to(B.dtype) @ B  # g (N, r)

    @staticmethod
    def grad_input(dy, W, g, A, s, mask, dtype):
        dx = dy @ W  # (N, in), dy's dtype
        low = (g * s) @ A  # (N, in), adapter dtype
        if mask is not None:
            low = low * mask.to(low.dtype)
        return dx + low.to(dx.dtype)

    @staticmethod
    def grad_A(g, xd, s):
        return (g.T @ xd.to(g.dtype)) * s  # (r, in)

    @staticmethod
    def grad_B(dy, u, s):
        return (dy.to(u.dtype).T @ u) * s  # (out, r)


class _TritonOps:
    @staticmethod
    def _gemm():
        from ._triton_gemm import gemm_lowrank  # triton imported here, on first use only

        return gemm_lowrank

    @staticmethod
    def forward(x, W, b, A, B, s, mask):
        gemm = _TritonOps._gemm()
        xd = _dropped(x, mask, A.dtype)
        u = gemm(xd, A.T, out_dtype=A.dtype)  # (N, r)
        y = gemm(x, W.T, low=u, high=B.T, scale=s, bias=b, out_dtype=x.dtype)  # s u B^T + b in the epilogue
        return y, u

    @staticmethod
    def low_rank_grad(dy, B):
        return _TritonOps._gemm()(dy, B, out_dtype=B.dtype)

    @staticmethod
    def grad_input(dy, W, g, A, s, mask, dtype):
        gemm = _TritonOps._gemm()
        if mask is None:
            return gemm(dy, W, low=g, high=A, scale=s, out_dtype=dtype)  # s g A in the epilogue
        low = gemm(g, A, out_dtype=torch.float32) * s * mask.to(torch.float32)
        return (gemm(dy, W, out_dtype=torch.float32) + low).to(dtype)

    @staticmethod
    def grad_A(g, xd, s):
        return _TritonOps._gemm()(g.T, xd, out_dtype=g.dtype) * s

    @staticmethod
    def grad_B(dy, u, s):
        return _TritonOps._gemm()(dy.T, u, out_dtype=u.dtype) * s


OPS = {"torch": _TorchOps, "triton": _TritonOps}


class LoraLinearFunction(torch.autograd.Function):
    """One node for y = x W^T + b + s ((x * M) A^T) B^T; 2-D x. Saves x, u = x_d A^T (N, r) and M.

    W may also be a callable `dtype -> W (out, in)` (a frozen weight stored in another form, e.g. QLoRA's NF4 codes:
    qlora_linear.py): it is called in forward, and again in backward for dx, and W itself is never saved."""

    @staticmethod
    def forward(ctx, x, W, b, A, B, scaling, mask, backend):
        ops = OPS[backend]
        make_W = W if callable(W) else None  # (a tensor is not callable)
        if make_W is not None:
            W = make_W(x.dtype)
        y, u = ops.forward(x, W, b, A, B, scaling, mask)
        ctx.save_for_backward(x, None if make_W is not None else W, A, B, u, mask)
        ctx.scaling, ctx.ops, ctx.has_bias = scaling, ops, b is not None
        ctx.make_W, ctx.b_dtype = make_W, None if b is None else b.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, u, mask = ctx.saved_tensors
        ops, s = ctx.ops, ctx.scaling
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        dx = dW = db = dA = dB = None
        g = ops.low_rank_grad(dy, B) if (need_x or need_A) else None  # (N, r)
        if need_x and ctx.make_W is not None:
            W = ctx.make_W(x.dtype)  # rebuilt for dx, dropped after it
        if need_x:
            dx = ops.grad_input(dy, W, g, A, s, mask, x.dtype)
        if need_A:
            dA = ops.grad_A(g, _dropped(x, mask, A.dtype), s).to(A.dtype)
        if need_B:
            dB = ops.grad_B(dy, u, s).to(B.dtype)
        if need_W:  # not LoRA's case (W frozen); kept so that a trainable base still gets its gradient
            dW = (dy.T @ x.to(dy.dtype)).to(W.dtype)
        if need_b and ctx.has_bias:
            db = dy.sum(0).to(ctx.b_dtype)
        return dx, dW, db, dA, dB, None, None, None


def fused_lora_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                scaling: float, dropout_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The fused LoRA linear: `lora_linear_reference`'s result, with the backward described in the module docstring.
    x (..., in); dropout_mask, if given, x's shape."""
    which = resolve(backend, x.device)
    in_features = x.shape[-1]
    if W.shape[1] != in_features or A.shape[1] != in_features or B.shape != (W.shape[0], A.shape[0]):
        raise ValueError(f"lora_linear: shapes do not fit: x {tuple(x.shape)}, W {tuple(W.shape)}, A "
                         f"{tuple(A.shape)}, B {tuple(B.shape)} (want W (out, in), A (r, in), B (out, r)).")
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"lora_linear: dropout_mask has shape {tuple(dropout_mask.shape)}, x has "
                         f"{tuple(x.shape)}; pass the mask of x itself (nn.Dropout's x * mask).")
    lead = x.shape[:-1]
    x, W, b, node_context = autocast_inputs(x, W, b)
    x2 = x.reshape(-1, in_features)
    mask2 = dropout_mask.reshape(-1, in_features) if dropout_mask is not None else None
    with node_context:
        y = LoraLinearFunction.apply(x2, W, b, A, B, float(scaling), mask2, which)
    return y.reshape(*lead, W.shape[0])


def autocast_inputs(x: torch.Tensor, W: torch.Tensor | None, b: torch.Tensor | None):
    """(x, W, b, context) for running a fused node: under torch.autocast, x, W and b cast to the autocast dtype (as
    autocast casts F.linear's inputs; W None: left as is) and a context that turns autocast off inside the node, so
    its rank-r path stays in the adapter's dtype; otherwise the inputs unchanged and a context that does nothing."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, W, b, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)
    return (x.to(dtype), W.to(dtype) if W is not None else None, b.to(dtype) if b is not None else None,
            torch.autocast(device_type, enabled=False))
