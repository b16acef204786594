"""The runtime switch that routes adapter layers through their fused nodes (no config field, no file key).

    peftlab.kernels.enable(model, backend="auto")   # returns how many layers now take the fast path when they can
    peftlab.kernels.disable(model)

A layer opts in by declaring a class attribute `kernel_backend` (LoRA's linear does; None means off); this module
only sets it. Whether a given forward can take the fused node is the layer's own decision, made from its own
adapters (LoRA's: methods/lora/fused.py), so kernels/ knows tensors and this attribute, nothing of any method.
"""

from __future__ import annotations

from torch import nn

from .backend import BACKENDS


def _switchable(model: nn.Module):
    return [m for m in model.modules() if hasattr(type(m), "kernel_backend")]


def enable(model: nn.Module, backend: str = "auto") -> int:
    """Turn the fused path on for every layer of `model` that declares the switch; returns their number.
    (Subclasses inherit the switch: DoRA's linear runs `fused_dora_linear` with it; LoRA-FA, with its own forward,
    never consults it.)"""
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
