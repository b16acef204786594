"""lm_head + cross-entropy over row chunks: the loss and its gradients without ever holding the (N, V) logits.

Math, for hidden h (N, d), lm_head weight W (V, d), optional bias c (V,), labels y (N,) with `ignore_index` rows
skipped (the set T of target rows, |T| = n):

    z_t   = W h_t + c                         (V,)   logits of row t, fp32
    l_t   = logsumexp(z_t) - z_t[y_t]                loss of row t
    L     = sum_{t in T} l_t                         (reduction="sum"; "mean" divides by n, as F.cross_entropy)
    p_t   = softmax(z_t) - onehot(y_t)        (V,)   dL/dz_t
    dh_t  = W^T p_t                           (d,)   0 for ignored rows
    dW    = sum_t p_t h_t^T                   (V, d)
    dc    = sum_t p_t                         (V,)

The forward walks the target rows in chunks of `chunk_size` and, when gradients are wanted, computes p, dh and dW
for the chunk in the same pass (while z is at hand), so backward only scales them by the incoming gradient: one
logits GEMM and two gradient GEMMs per chunk, none recomputed. Ignored rows (prompt tokens, padding, the last
position) are dropped before the GEMMs: they cost nothing.

Memory (N rows, V vocab, d hidden, c = chunk rows, e = bytes per element of h and W, 2 for bf16):
- transient per chunk: the fp32 logits c V 4 B, turned into p in place, plus p in W's dtype c V e B for the GEMMs;
- kept from forward to backward: dh (N, d) in h's dtype (the same size as h) when h needs a gradient, and dW as fp32
  (V, d) when W trains (accumulated over chunks in fp32; a frozen lm_head, the LoRA case, skips it).
Against the unchunked loss (HF's): logits N V e B from the lm_head, their fp32 copy N V 4 B, and the fp32 gradient
of the same size in backward. For Llama-3.2-1B (V = 128256, d = 2048) at 8 x 2048 tokens that is 4.0 + 7.8 + 7.8
GiB; here, with the default chunk (about 1024 rows: 0.5 GiB of fp32 logits), 0.5 + 0.25 GiB per chunk plus dh
(64 MiB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 512 * 2**20
"""Default chunk: as many rows as keep one chunk's fp32 logits within 512 MiB (1046 rows at V = 128256)."""


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias: torch.Tensor | None = None, ignore_index: int = -100,
                                   reduction: str = "sum") -> torch.Tensor:
    """F.cross_entropy over the full fp32 logits (the oracle; what lm_loss_sum computes from HF's logits)."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


class ChunkedLinearCE(torch.autograd.Function):
    """Summed loss over target rows, gradients computed in forward chunk by chunk (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_size, want_grad):
        rows = (labels != ignore_index).nonzero().squeeze(1)  # (n,) target rows
        need_h, need_w, need_b = (want_grad and n for n in ctx.needs_input_grad[:3])
        need_b = need_b and bias is not None
        dh = torch.zeros_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start:start + chunk_size]
            h = hidden.index_select(0, idx)  # (c, d)
            y = labels.index_select(0, idx)  # (c,)
            z = F.linear(h, weight, bias).float()  # (c, V) fp32
            lse = torch.logsumexp(z, dim=1)  # (c,)
            picked = z.gather(1, y[:, None]).squeeze(1)
            total += (lse - picked).sum()
            if need_h or need_w or need_b:
                p = z.sub_(lse[:, None]).exp_()  # softmax, in place: z is not needed any more
                p[torch.arange(idx.numel(), device=p.device), y] -= 1.0
                if need_b:
                    db += p.sum(0)
                p = p.to(weight.dtype)  # (c, V) for the GEMMs
                if need_h:
                    dh.index_copy_(0, idx, (p @ weight).to(hidden.dtype))  # (c, d)
                if need_w:
                    dw.addmm_(p.T.float() if weight.dtype != torch.float32 else p.T, h.float())  # (V, d) fp32
                del p
            del z
        ctx.save_for_backward(dh, dw, db)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw, db = ctx.saved_tensors
        g = grad_total.float()
        d_hidden = (dh * g.to(dh.dtype)) if dh is not None else None
        d_weight = (dw * g).to(ctx.weight_dtype) if dw is not None else None
        d_bias = (db * g).to(ctx.bias_dtype) if db is not None else None
        return d_hidden, d_weight, d_bias, None, None, None, None


def _default_chunk(vocab: int) -> int:
    return max(64, (CHUNK_BYTES // (4 * vocab)) // 64 * 64)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "sum",
                                 chunk_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    """cross_entropy(hidden W^T + bias, labels) in chunks of rows (module docstring); hidden (N, d) or (..., d) with
    labels of the leading shape. reduction "sum" or "mean" (over non-ignored rows; NaN when there are none, as
    F.cross_entropy). backend: "auto"/"torch" (this is a pure-torch path; there is no Triton version)."""
    if backend not in ("auto", "torch"):
        if backend == "triton":
            raise RuntimeError("chunked_linear_cross_entropy has no Triton version (its GEMMs are cuBLAS calls and "
                               "the rest is a few elementwise ops per chunk); use backend='auto' or 'torch'.")
        raise ValueError(f"Unknown backend {backend!r}; choose 'auto' or 'torch'.")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must be (vocab, {d}) for hidden (..., {d}); got {tuple(weight.shape)}.")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}.")
    hidden2, labels1 = hidden.reshape(-1, d), labels.reshape(-1)
    targets = labels1[labels1 != ignore_index]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}; saw "
                         f"values from {int(targets.min())} to {int(targets.max())}.")
    chunk = chunk_size or _default_chunk(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}.")
    total = ChunkedLinearCE.apply(hidden2, weight, bias, labels1, ignore_index, chunk, torch.is_grad_enabled())
    if reduction == "mean":
        total = total / targets.numel()
    return total
