"""The runtime switch that routes LoRA linear layers through `fused_lora_linear` (no config field, no file key).

    peftlab.kernels.enable(model, backend="auto")   # returns how many layers now take the fast path when they can
    peftlab.kernels.disable(model)

A layer opts in by declaring a class attribute `kernel_backend` (LoraLinear does; None means off) and calling
`fused_forward(self, x)` first in its forward. The fused path runs only where it computes exactly the layer's
forward; otherwise `fused_forward` returns None and the layer runs its plain forward:
- one live adapter (active, not merged, not disabled); several, or none, take the plain path;
- no dropout at work (lora_dropout = 0, or eval mode): the plain path draws its mask from the global RNG;
- a plain nn.Linear base (not Conv1D's transposed weight, not QLoRA's NF4 stand-in, not a subclass);
- no extra positional/keyword arguments to forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import BACKENDS
from .lora_linear import fused_lora_linear


def _switchable(model: nn.Module):
    return [m for m in model.modules() if hasattr(type(m), "kernel_backend")]


def enable(model: nn.Module, backend: str = "auto") -> int:
    """Turn the fused LoRA linear on for every layer of `model` that declares the switch; returns their number.
    (Subclasses inherit the switch; those with their own forward, DoRA and LoRA-FA, simply never consult it.)"""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown kernel backend {backend!r}; choose one of {BACKENDS}.")
    layers = _switchable(model)
    if not layers:
        raise ValueError("peftlab.kernels.enable found no layer with a fused path in this model (LoRA linear layers "
                         "have one); wrap the model with get_peft_model(model, LoraConfig(...)) first.")
    for m in layers:
        m.kernel_backend = backend
    return len(layers)


def disable(model: nn.Module) -> None:
    for m in _switchable(model):
        m.kernel_backend = None


def fused_forward(layer, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor | None:
    """The layer's output through `fused_lora_linear`, or None when the conditions in the module docstring fail."""
    if layer.kernel_backend is None or args or kwargs or type(layer.base_layer) is not nn.Linear:
        return None
    if getattr(layer, "fan_in_fan_out", False):
        return None
    live = layer.live_adapters()
    if len(live) != 1:
        return None
    name = live[0]
    if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    base = layer.base_layer
    return fused_lora_linear(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                             layer.scaling[name], backend=layer.kernel_backend)
