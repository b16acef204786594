"""The layer half of the method contract: a module that wraps one base module and owns adapter weights.

A method's layer subclasses `AdapterLayer`. The base module stays as `self.base_layer` (so parameter names
read `...q_proj.base_layer.weight` and `...q_proj.lora_A.default.weight`, as in HF PEFT), and each named
adapter's tensors live in `nn.ModuleDict`/`nn.ParameterDict` attributes keyed by adapter name.

What a subclass provides:
- `add_adapter(name, config, module_name)`: create and initialise that adapter's tensors.
- `adapter_tensors(name)`: {file-key suffix: parameter}, e.g. {"lora_A.weight": ..., "lora_B.weight": ...}.
  This is the single source of truth for which parameters an adapter owns: freezing, counting, saving and
  loading all read it (nothing is found by substring matching on names).
- `forward(x, ...)`.
- `delta_weight(name)` (optional): the adapter's update in the base weight's shape, if it can be merged.
- `merged_weight(name, W)` / `unmerged_weight(name, W)` (optional): how merging changes the base weight when it is not
  W +/- delta_weight (DoRA rescales); core's merge/unmerge loop, safe_merge check and bookkeeping call them.
- `weight_to_merge_into()` / `store_merged_weight(W)` (optional): where merging reads the base weight and puts the
  result, for a base that does not hold a float weight (QLoRA's NF4 base: merged into its dequantised W_hat, the
  matrix the adapter was trained against, and replaced by a float layer; `unmerge` puts the NF4 base back).
- `trainable_tensors(name)` (optional): the part of `adapter_tensors` that trains. Default: every nn.Parameter
  in it. A method whose adapter holds parameters that are saved but never trained returns fewer (LoRA-FA keeps
  A frozen at its random init); core then leaves those at requires_grad=False.
- `unwrapped()` (optional): the plain module put back when the wrapper leaves the model. Default: `base_layer`; a
  layer that replaced its base by a stand-in rebuilds a plain one (QLoRA: nn.Linear with the dequantised weight).

Model-level tensors a method declares with `Method.shared_tensors` (VeRA's projections, one pair for all layers)
are not owned by any layer: core keeps them on the wrapped model and gives every layer of the adapter a reference,
read with `self.shared_tensor(name, adapter_name)`.

The base class does the bookkeeping every method needs: which adapters are active, which are merged into
the base weight, disabling, deleting, and merge/unmerge through `delta_weight`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def linear_shape(base_layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like layer: nn.Linear stores its weight as
    (out, in); transformers' Conv1D (GPT-2) stores it transposed, (in, out)."""
    from .targets import Conv1D

    fan_in_fan_out = isinstance(base_layer, Conv1D)
    if isinstance(base_layer, nn.Linear):  # its own sizes: a quantised subclass (bitsandbytes' Linear4bit) packs weight
        return base_layer.in_features, base_layer.out_features, False
    out_f, in_f = base_layer.weight.shape
    return (out_f, in_f, True) if fan_in_fan_out else (in_f, out_f, False)


class AdapterLayer(nn.Module):
    """Base class of every adapter-carrying wrapper. See the module docstring for the contract."""

    # Attribute names of the per-adapter containers (ModuleDict/ParameterDict/plain dict keyed by adapter).
    # `delete_adapter` removes the adapter's entry from each of them.
    adapter_containers: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # name -> the model-level store of that shared tensor (keyed by adapter), filled in by core after the
        # method's `shared_tensors` hook ran. A plain dict, not a ModuleDict: the stores are registered once on the
        # wrapped model, and registering them here too would repeat them in every layer's state dict.
        self.shared_stores: dict[str, nn.Module] = {}

    # ---- to implement ------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: Any, module_name: str) -> None:
        raise NotImplementedError

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} adapters cannot be merged into the base weight.")

    def trainable_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The part of `adapter_tensors(adapter_name)` that trains (same keys); default every nn.Parameter."""
        return {k: t for k, t in self.adapter_tensors(adapter_name).items() if isinstance(t, nn.Parameter)}

    def shared_tensor(self, name: str, adapter_name: str) -> torch.Tensor:
        """The model-level tensor `name` that this layer's method declared with `Method.shared_tensors`."""
        store = self.shared_stores.get(name)
        if store is None or adapter_name not in store:
            raise RuntimeError(
                f"{type(self).__name__} needs the shared tensor {name!r} of adapter {adapter_name!r}, which the "
                f"wrapped model has not handed it (known: {sorted(self.shared_stores)}). Add adapters through "
                "get_peft_model / PeftModel.add_adapter, which create the method's shared tensors after injection."
            )
        return store[adapter_name]

    # ---- shared bookkeeping ------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        first = getattr(self, self.adapter_containers[0])
        return list(first.keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:  # lets code that reads `module.weight` (e.g. tied heads) keep working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def set_active(self, adapter_names: list[str]) -> None:
        self.active_adapters = [a for a in adapter_names if a in self.adapter_names]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def base_weight(self) -> nn.Parameter:
        return self.base_layer.weight

    def unwrapped(self) -> nn.Module:
        """The plain module that takes this wrapper's place when it leaves the model (`unload`, `merge_and_unload`,
        deleting its last adapter). Default: the base layer itself. A layer whose base is a stand-in that plain
        models do not hold returns a plain module rebuilt from it (QLoRA's 4-bit base comes back as an nn.Linear with
        the dequantised weight)."""
        return self.base_layer

    # Words for the safe_merge error: "Merging <merge_label>adapter ... <merge_hint>" (DoRA names itself and its norm).
    merge_label = ""
    merge_hint = "Check the adapter weights for NaN/inf."

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with this adapter folded in, from the current one (both fp32): W + delta_weight. A method
        whose update is not additive overrides this (DoRA rescales) and `unmerged_weight` with its inverse."""
        return weight + self.delta_weight(adapter_name).to(torch.float32)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of `merged_weight` (fp32 in and out): W' - delta_weight."""
        return weight - self.delta_weight(adapter_name).to(torch.float32)

    def weight_to_merge_into(self) -> torch.Tensor:
        """The float weight that merging starts from, as the adapter sees the base in forward: the base weight itself
        (default). A layer whose base is not a float weight returns the float matrix its forward computes with
        (QLoRA: the dequantised NF4 weight W_hat the adapter was trained against, not the original weights)."""
        weight = self.base_weight().data
        if not weight.is_floating_point():  # e.g. bitsandbytes' packed 4-bit codes in a transformers-quantised model
            raise ValueError(
                f"{type(self.base_layer).__name__} holds its weight quantised ({weight.dtype}), which an update cannot "
                "be added to; nothing was merged. Merge into a full-precision copy of the base instead: load it "
                "without quantization_config, then PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().")
        return weight

    def store_merged_weight(self, weight: torch.Tensor) -> None:
        """Put the merged fp32 `weight` in place of the base weight (default: copied into it, cast to its dtype). A
        layer whose base cannot hold a float weight replaces its base (QLoRA: by a float layer; the NF4 base is kept
        aside for `unmerge`)."""
        target = self.base_weight()
        target.data.copy_(weight.to(target.dtype))

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold each adapter into the base weight with `merged_weight` (fp32 arithmetic, cast back), starting from
        `weight_to_merge_into` and ending with `store_merged_weight`."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name not in self.adapter_names or name in self.merged_adapters:
                continue
            with torch.no_grad():
                merged = self.merged_weight(name, self.weight_to_merge_into().to(torch.float32))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"Merging {self.merge_label}adapter {name!r} would put NaN/inf into "
                    f"{type(self.base_layer).__name__}'s weight; the base weight was left unchanged. {self.merge_hint}"
                )
            self.store_merged_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo merged adapters with `unmerged_weight`, newest first. Exact up to one float rounding per weight."""
        weight = self.base_weight()
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            with torch.no_grad():
                restored = self.unmerged_weight(name, weight.data.to(torch.float32))
            weight.data.copy_(restored.to(weight.dtype))
            self.merged_adapters.pop()

    def live_adapters(self) -> list[str]:
        """Adapters whose branch must run in forward: active, not merged, and not disabled."""
        if self.disabled:
            return []
        return [a for a in self.active_adapters if a not in self.merged_adapters]

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"
