"""(IA)³ layers: one learned scaling vector per adapted linear layer.

Math (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
§3.3), for a linear layer y = W x + b with W (out, in):

    attention-side target (keys, values):      y = l ⊙ (W x + b)        l = ia3_l, out_features entries
    feedforward target (feedforward_modules):  y = W (l ⊙ x) + b        l = ia3_l, in_features entries

(the paper's l_ff ⊙ γ(W_1 x) feeding W_2 is the second form on W_2). Several active adapters on one layer multiply:
the feedforward ones' vectors scale the input, the others' the output.

Tensor layout (HF PEFT's, so files interchange): ia3_l is (out, 1) for an output scale and (1, in) for an input
scale, whatever the base layer's storage; file key `base_model.model.<path>.ia3_l`. transformers' Conv1D (GPT-2)
stores W as (in, out) and computes x W + b; the same vectors apply.

Merged form: scaling the output is W' = diag(l) W and b' = l ⊙ b; scaling the input is W' = W diag(l) (b unchanged).
Merging multiplies the weight (and, for an output scale, the bias) along that axis; unmerging divides again, which
is exact only up to one float rounding per weight (x * l / l need not give x back bit for bit), and impossible where
an entry of l is 0: that row or column of W was multiplied by 0. Unmerge then raises and leaves the weights as they
are (merge_and_unload needs no unmerge and works).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...core.layer import AdapterLayer, linear_shape
from .config import IA3Config


def is_feedforward(module_name: str, feedforward_modules: list[str] | str | None) -> bool:
    """HF PEFT's rule, kept exactly so a file means the same module set in both libraries: a string is a regular
    expression matched against the whole name; a list entry matches any name that ENDS with it (no "." boundary:
    entry "o" matches "...DenseReluDense.wo")."""
    if feedforward_modules is None:
        raise ValueError(
            f"IA3 layer {module_name!r}: feedforward_modules is unresolved (None). Adapters are added through "
            "get_peft_model / PeftModel.add_adapter, which fill it in from the model type (Method.complete_config).")
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_name) is not None
    return any(module_name.endswith(entry) for entry in feedforward_modules)


def _adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    # fp32 vectors on a half-precision base (PEFT keeps adapter weights in fp32 by default): a vector entry near 1
    # updated by ~1e-4 per step would not move at all in bf16 (spacing 2^-7 near 1).
    return torch.float32 if base_weight.dtype in (torch.float16, torch.bfloat16) else base_weight.dtype


class IA3Linear(AdapterLayer):
    """(IA)³ on nn.Linear (weight (out, in)) or transformers' Conv1D (weight (in, out))."""

    adapter_containers = ("ia3_l", "feedforward")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}  # adapter -> scales the input (True) or the output (False)

    def add_adapter(self, adapter_name: str, config: IA3Config, module_name: str) -> None:
        if self.fan_in_fan_out:
            # The file must say the weight is (in, out), as PEFT records it when it meets a Conv1D.
            config.fan_in_fan_out = True
        feedforward = is_feedforward(module_name, config.feedforward_modules)
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)  # PEFT's shapes
        weight = self.base_layer.weight
        dtype, device = _adapter_dtype(weight), weight.device
        if config.init_ia3_weights:
            vector = torch.ones(shape, dtype=dtype, device=device)
        else:
            vector = torch.randn(shape, dtype=dtype, device=device)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self.feedforward[adapter_name] = feedforward

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l[adapter_name]}

    # ---- forward ---------------------------------------------------------------------------------------

    def _scales(self, names: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(input scale (in,), output scale (out,)): the product of these adapters' vectors on each side."""
        scale_in = scale_out = None
        for name in names:
            v = self.ia3_l[name].flatten()
            if self.feedforward[name]:
                scale_in = v if scale_in is None else scale_in * v
            else:
                scale_out = v if scale_out is None else scale_out * v
        return scale_in, scale_out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scale_in, scale_out = self._scales(self.live_adapters())
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)  # (..., in) * (in,)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = (result * scale_out).to(result.dtype)  # (..., out) * (out,)
        return result

    # ---- merging -----------------------------------------------------------------------------------------

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """The vector shaped to broadcast against the stored weight: Linear (out, in) scales rows for an output
        scale and columns for an input scale; Conv1D (in, out) the other way round. fp32."""
        v = self.ia3_l[adapter_name].detach().flatten().to(torch.float32)
        scales_dim0 = self.feedforward[adapter_name] == self.fan_in_fan_out  # the scaled feature is the 1st dim
        return v[:, None] if scales_dim0 else v[None, :]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """What merging adds to the base weight: W ⊙ l - W along the scaled axis (merge also scales the bias of an
        output-scaled layer, which this weight-shaped tensor cannot express)."""
        weight = self.base_layer.weight.detach().to(torch.float32)
        return weight * self._weight_scale(adapter_name) - weight

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Multiply each adapter's vector into the base weight (and the bias, for an output scale); fp32, cast back."""
        names = self.active_adapters if adapter_names is None else adapter_names
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        for name in names:
            if name not in self.adapter_names or name in self.merged_adapters:
                continue
            new_weight = weight.data.to(torch.float32) * self._weight_scale(name)
            new_bias = None
            if bias is not None and not self.feedforward[name]:
                new_bias = bias.data.to(torch.float32) * self.ia3_l[name].detach().flatten().to(torch.float32)
            finite = torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())
            if safe_merge and not finite:
                raise ValueError(
                    f"Merging IA3 adapter {name!r} would put NaN/inf into {type(self.base_layer).__name__}'s weight; "
                    "the base weight was left unchanged. Check the adapter's ia3_l vectors for NaN/inf.")
            weight.data.copy_(new_weight.to(weight.dtype))
            if new_bias is not None:
                bias.data.copy_(new_bias.to(bias.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Divide the merged vectors out again, newest first. Exact up to one float rounding per weight; refused
        (nothing changed) when a merged vector holds a 0, whose row/column of the weight is lost."""
        for name in self.merged_adapters:
            v = self.ia3_l[name].detach()
            zeros = int((v == 0).sum())
            if zeros:
                side = "input" if self.feedforward[name] else "output"
                raise ValueError(
                    f"Cannot unmerge IA3 adapter {name!r} from {type(self.base_layer).__name__} ({side} scale of "
                    f"{v.numel()} entries): {zeros} entries of its ia3_l vector are 0, so merging multiplied those "
                    "weights by 0 and dividing cannot bring them back. The merged weights were left as they are; "
                    "reload the base model to get the original weights (merge_and_unload, which never unmerges, is "
                    "fine with zero scales).")
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data.copy_((weight.data.to(torch.float32) / self._weight_scale(name)).to(weight.dtype))
            if bias is not None and not self.feedforward[name]:
                v = self.ia3_l[name].detach().flatten().to(torch.float32)
                bias.data.copy_((bias.data.to(torch.float32) / v).to(bias.dtype))
