"""LoRA-FA layers: LoRA with A frozen, and a backward that keeps only the r-dimensional A x.

Math (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation"), for a linear layer W (out, in),
input x (..., in), h = dropout(x), scaling s = alpha / r (alpha / sqrt(r) with rsLoRA):

    forward     u = A h                 (..., r)       A (r, in)  frozen at its random init
                y = W x + bias + s B u  (..., out)     B (out, r) trained, starts at 0

    backward    g = s dy                (..., out)     dy = dL/dy
                dB = g^T u              (out, r)       summed over all leading dims
                dh = (g B) A            (..., in)
                dx = dy W  (+ dh through dropout)      W frozen: no dW, so nothing of x is needed
                dbias = sum of dy       (out)          only when the bias trains (bias="lora_only"/"all")

LoRA has to keep x (..., in) for dA = B^T g x^T. With A and W frozen every gradient above needs only u (..., r)
and the frozen weights, so `LoraFaFunction` saves u alone: per adapted layer r / in of LoRA's activation memory
(r = 8, in = 4096: 1/512), plus the dropout mask (1 byte per input element) when lora_dropout > 0.

Note: PyTorch's autograd already skips saving an input whose partner weight does not require grad, so merely
setting A.requires_grad=False under the ordinary LoRA forward saves the same tensors; the custom Function makes
that saving explicit instead of depending on it, and computes base and adapter in one node
(benchmarks/lora_fa_memory.py measures all three).

The fused path runs for one live adapter on a plain nn.Linear or Conv1D whose weight is frozen, with grad
enabled; anything else (no_grad, several live adapters, a subclassed or quantized base) falls back to LoRA's
forward with A frozen, which computes the same output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.targets import Conv1D
from ..lora.config import LoraConfig
from ..lora.layer import LoraLinear


class LoraFaFunction(torch.autograd.Function):
    """y = base(x) + s B (A h) with a backward that saves only u = A h (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, h, base_layer, weight, bias, A, B, scaling, fan_in_fan_out):
        # `weight` and `bias` are base_layer's own tensors, passed so that autograd sees them (version checks, and
        # the bias's gradient when it trains); the base output is the module's own forward, so it is bit-identical
        # to what LoRA computes.
        result = base_layer(x)
        u = F.linear(h, A)                                            # (..., r)
        result = result + (F.linear(u, B) * scaling).to(result.dtype)
        ctx.save_for_backward(u, weight, A, B)
        ctx.scaling, ctx.fan_in_fan_out = scaling, fan_in_fan_out
        ctx.x_dtype, ctx.h_dtype = x.dtype, h.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return result

    @staticmethod
    def backward(ctx, dy):
        u, weight, A, B = ctx.saved_tensors
        need_x, need_h, _, _, need_bias, _, need_B = ctx.needs_input_grad[:7]
        dx = dh = dbias = dB = None
        g = dy.to(B.dtype) * ctx.scaling                              # (..., out)
        if need_B:
            dB = g.reshape(-1, g.shape[-1]).T @ u.reshape(-1, u.shape[-1]).to(B.dtype)  # (out, r)
        if need_h:
            dh = ((g @ B) @ A).to(ctx.h_dtype)                          # (..., r) -> (..., in)
        if need_x:
            # nn.Linear stores W as (out, in): dx = dy W; Conv1D stores (in, out): dx = dy W^T.
            w = weight.T if ctx.fan_in_fan_out else weight
            dx = (dy @ w.to(dy.dtype)).to(ctx.x_dtype)
        if need_bias:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, dh, None, None, dbias, None, dB, None, None


class LoraFaLinear(LoraLinear):
    """LoRA-FA on nn.Linear or transformers' Conv1D: LoRA's tensors and file keys, A frozen, lean backward."""

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        super().add_adapter(adapter_name, config, module_name)
        self.lora_A[adapter_name].weight.requires_grad_(False)

    def trainable_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        # A stays frozen at its random init (the method); core keeps it at requires_grad=False.
        return {"lora_B.weight": self.lora_B[adapter_name].weight}

    def _fused_ok(self, live: list[str], args, kwargs) -> bool:
        base = self.base_layer
        if len(live) != 1 or args or kwargs or not torch.is_grad_enabled():
            return False
        if type(base) not in (nn.Linear, Conv1D) or base.weight.requires_grad:
            return False
        A = self.lora_A[live[0]].weight
        return not A.requires_grad  # someone unfroze A: its gradient needs x, so use autograd's LoRA path

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        live = self.live_adapters()
        if not self._fused_ok(live, args, kwargs):
            return super().forward(x, *args, **kwargs)
        name = live[0]
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        h = self.lora_dropout[name](x.to(A.dtype))  # the same tensor as x when there is no dropout and no cast
        base = self.base_layer
        return LoraFaFunction.apply(x, h, base, base.weight, base.bias, A, B, self.scaling[name], self.fan_in_fan_out)
