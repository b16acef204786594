"""Bottleneck adapter layers: a small residual MLP on a sublayer's output.

Math (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1 and Fig. 2; Pfeiffer et al. 2020,
"AdapterFusion"), on the output h (..., d) of a sublayer's output projection (the module this layer wraps):

    out = h + dropout(W_up act(W_down h + b_down) + b_up)        W_down (m, d), b_down (m), W_up (d, m), b_up (d)

with m = d / reduction_factor. W_up and b_up start at zero (the paper's near-identity init, made exact), so the
adapter starts as identity; W_down starts Kaiming-uniform (nn.Linear's default, as LoRA's A) and b_down at zero, so
the first gradient step already moves W_up. Parameters per adapter: 2 d m + d + m.

The adapter sits between the projection and the residual add of the sublayer (Houlsby's "before adding the skip
connection back"), because it wraps the projection itself: for Llama `self_attn.o_proj` and `mlp.down_proj`, for
BERT `attention.output.dense` (before its dropout and LayerNorm) and `output.dense`.

Several active adapters on one layer are applied one after the other (each on the previous one's output, as
AdapterHub's Stack). Not mergeable: act is non-linear, so no weight W' gives W' x = out for every x.

File keys (peftlab's own; PEFT has no such method): `base_model.model.<path>.adapter_down.weight`, `.adapter_down.bias`,
`.adapter_up.weight`, `.adapter_up.bias`.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import ConfigError
from ...core.layer import AdapterLayer, linear_shape
from .config import ACTIVATIONS, BottleneckConfig


def _adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    # fp32 adapter on a half-precision base (as PEFT keeps adapter weights): small updates survive the optimizer step.
    return torch.float32 if base_weight.dtype in (torch.float16, torch.bfloat16) else base_weight.dtype


def bottleneck_size(d: int, reduction_factor: int, module_name: str) -> int:
    """m = d / reduction_factor, refusing a factor that does not divide d."""
    if d % reduction_factor:
        divisors = [k for k in range(1, min(d, 64) + 1) if d % k == 0]
        raise ConfigError(
            f"BottleneckConfig.reduction_factor={reduction_factor} does not divide the output size d={d} of "
            f"{module_name!r} (the bottleneck is d / reduction_factor wide). Pick a divisor of {d}, e.g. one of "
            f"{divisors[-6:]}.")
    return d // reduction_factor


class BottleneckLinear(AdapterLayer):
    """A bottleneck adapter on the output of nn.Linear (weight (out, in)) or transformers' Conv1D (weight (in, out))."""

    adapter_containers = ("adapter_down", "adapter_up", "adapter_act", "adapter_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()

    def add_adapter(self, adapter_name: str, config: BottleneckConfig, module_name: str) -> None:
        d = self.out_features
        m = bottleneck_size(d, config.reduction_factor, module_name)
        weight = self.base_layer.weight
        kw = dict(dtype=_adapter_dtype(weight), device=weight.device)
        down, up = nn.Linear(d, m, **kw), nn.Linear(m, d, **kw)  # down keeps nn.Linear's Kaiming-uniform weight
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.adapter_act[adapter_name] = getattr(nn, ACTIVATIONS[config.non_linearity])()
        self.adapter_dropout[adapter_name] = (nn.Dropout(config.adapter_dropout) if config.adapter_dropout > 0
                                              else nn.Identity())

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError(
            f"Bottleneck adapter {adapter_name!r} cannot be merged into the base weights: it computes "
            "h + up(act(down(h))) with a non-linear act, which no weight matrix reproduces. Keep it as an adapter "
            "(save_pretrained / from_pretrained).")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)  # (..., d)
        for name in self.live_adapters():
            down = self.adapter_down[name]
            z = self.adapter_up[name](self.adapter_act[name](down(h.to(down.weight.dtype))))  # (..., m) -> (..., d)
            h = h + self.adapter_dropout[name](z).to(h.dtype)
        return h
