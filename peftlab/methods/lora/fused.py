"""When a LoRA linear layer takes the fused node (`peftlab.kernels.fused_lora_linear`): LoRA's side of the runtime
switch. kernels/switch.py only turns the switch (`enable(model, backend)` sets each layer's `kernel_backend`); the
layer decides here, from its own adapters, whether the node computes exactly its forward. `fused_forward` returns None
(the layer runs its plain forward) unless all of these hold:
- one live adapter (active, not merged, not disabled); several, or none, take the plain path;
- no dropout at work (lora_dropout = 0, or eval mode): the plain path draws its mask from the global RNG;
- a plain nn.Linear base (not Conv1D's transposed weight, not a subclass), or a layer with a method
  `fused_base_forward(x, adapter_name)` that runs its own fused node for its other base and returns None where that
  node does not apply (QLoraLinear on its NF4 base: methods/qlora/layer.py, kernels/qlora_linear.py);
- no extra positional/keyword arguments to forward.
DoraLinear (methods/dora/layer.py) uses `fused_adapter`: under these conditions, and with no adapter merged (its norm
is that of the unmerged weight), it runs `fused_dora_linear` (kernels/dora_linear.py) instead of its plain forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ...kernels.lora_linear import fused_lora_linear


def fused_adapter(layer, args: tuple = (), kwargs: dict | None = None) -> str | None:
    """The one adapter a fused node can run alone on `layer`, or None: the switch is on, forward got no extra
    arguments, exactly one adapter is live, and no dropout is at work (the conditions of the module docstring that do
    not depend on the base layer). Shared by `fused_forward` and DoraLinear."""
    if layer.kernel_backend is None or args or kwargs:
        return None
    live = layer.live_adapters()
    if len(live) != 1:
        return None
    if layer.training and not isinstance(layer.lora_dropout[live[0]], nn.Identity):
        return None
    return live[0]


def fused_forward(layer, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor | None:
    """The layer's output through `fused_lora_linear` (or the layer's own `fused_base_forward`), or None when the
    conditions in the module docstring fail."""
    if layer.kernel_backend is None:
        return None
    plain_linear = type(layer.base_layer) is nn.Linear and not getattr(layer, "fan_in_fan_out", False)
    own = None if plain_linear else getattr(layer, "fused_base_forward", None)
    if own is None and not plain_linear:
        return None
    name = fused_adapter(layer, args, kwargs)
    if name is None:
        return None
    if own is not None:
        return own(x, name)
    base = layer.base_layer
    return fused_lora_linear(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                             layer.scaling[name], backend=layer.kernel_backend)
