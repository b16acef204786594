"""LN tuning's wrapper, PEFT's LNTuningLayer: a trained copy of the base module per adapter.

    y = copy_a(x)   while adapter a is active (exactly one may be), else base(x)

The copy starts equal to the base module (identity at init) and holds every parameter of it (LayerNorm: weight and
bias, RMSNorm: weight), under `ln_tuning_layers.<adapter>` (file keys `<path>.ln_tuning_layers.weight`, PEFT's).
Merging is replacing: the copy's values are written into the base module's parameters (the originals kept aside
for unmerge, which puts them back bit for bit); PEFT swaps the two modules instead, which leaves the same values
in the base's place. A base module is replaced by one adapter at a time, so merging a second raises, as in PEFT.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...core.layer import AdapterLayer
from .config import LNTuningConfig


class LNTuningLayer(AdapterLayer):
    adapter_containers = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()
        self._originals: dict[str, torch.Tensor] = {}  # the base's own values while an adapter is merged

    def add_adapter(self, adapter_name: str, config: LNTuningConfig, module_name: str) -> None:
        self.ln_tuning_layers[adapter_name] = copy.deepcopy(self.base_layer)

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {f"ln_tuning_layers.{k}": p for k, p in self.ln_tuning_layers[adapter_name].named_parameters()}

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.adapter_names and n not in self.merged_adapters]
        if not names:
            return
        if len(names) > 1 or self.merged_adapters:
            raise ValueError(
                f"LN tuning replaces the module with one adapter's copy, so only one adapter can be merged into it; "
                f"asked to merge {names} with {self.merged_adapters} already merged. Merge one adapter "
                "(merge_adapter(['name'])), or unmerge first.")
        copy_params = dict(self.ln_tuning_layers[names[0]].named_parameters())
        if safe_merge and not all(bool(torch.isfinite(p).all()) for p in copy_params.values()):
            raise ValueError(f"Merging LN tuning adapter {names[0]!r} would put NaN/inf into "
                             f"{type(self.base_layer).__name__}'s parameters; the base was left unchanged.")
        with torch.no_grad():
            for key, target in self.base_layer.named_parameters():
                self._originals[key] = target.detach().clone()
                target.copy_(copy_params[key].to(target.dtype))
        self.merged_adapters.append(names[0])

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        with torch.no_grad():
            for key, target in self.base_layer.named_parameters():
                target.copy_(self._originals.pop(key))
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        live = self.live_adapters()
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if len(live) > 1:
            raise ValueError(f"LN tuning adapters {live} are all active on one module, whose copy only one of them "
                             f"can replace; activate one (set_adapter({live[0]!r})).")
        out = self.ln_tuning_layers[live[0]](x, *args, **kwargs)
        # The copy trains in fp32 when the base is bf16/fp16 (core keeps master weights in fp32): give the next
        # layer the dtype the base module would have given it.
        base_dtype = next(self.base_layer.parameters()).dtype
        return out.to(x.dtype) if torch.is_tensor(out) and out.dtype != base_dtype and x.is_floating_point() else out
