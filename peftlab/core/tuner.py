"""`PeftModel.base_model` for layer-injecting methods (PEFT's tuner model, e.g. `LoraModel`), and the stores of
methods' model-level shared tensors that live on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import AdapterConfig

if TYPE_CHECKING:
    from .model import PeftModel


class SharedTensors(nn.Module):
    """One model-level tensor per adapter, as buffers named by adapter (see `Method.shared_tensors`). Registered on
    the TunerModel as `<name>`, so the state-dict names read `base_model.<name>.<adapter>` as in PEFT
    (`base_model.vera_A.default`). Buffers, not parameters: shared tensors never train."""

    def add(self, adapter_name: str, tensor: torch.Tensor, persistent: bool) -> None:
        self.register_buffer(adapter_name, tensor.detach(), persistent=persistent)

    def remove(self, adapter_name: str) -> None:
        self._buffers.pop(adapter_name, None)
        self._non_persistent_buffers_set.discard(adapter_name)

    def __contains__(self, adapter_name: str) -> bool:
        return adapter_name in self._buffers

    def __getitem__(self, adapter_name: str) -> torch.Tensor:
        return self._buffers[adapter_name]

    def __len__(self) -> int:
        return len(self._buffers)


class TunerModel(nn.Module):
    """`PeftModel.base_model`: holds the user's model as `.model`; forward and attribute access go straight through.
    Methods' shared tensors live here too, one `SharedTensors` store per name (listed in `shared_names`).

    It also answers what PEFT's tuner model (`LoraModel`, ...) answers, acting on the PeftModel that owns it:
    `set_adapter`, `merge_adapter(adapter_names=...)`, `disable_adapter_layers` / `enable_adapter_layers`, ..., and a
    method's own calls (`Method.tuner_calls`, e.g. AdaLoRA's `update_and_allocate(step)`), which reach the active
    adapters of that method; for an active method without it, such a call raises AttributeError naming both."""

    def __init__(self, model: nn.Module, owner: "PeftModel") -> None:
        super().__init__()
        self.model = model
        self.shared_names: list[str] = []
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner holds this one

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self._owner.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return self._owner.active_adapters

    @property
    def active_adapter(self):
        return self._owner.active_adapter

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self._owner.set_adapter(adapter_name)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._owner.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._owner.unmerge_adapter()

    def disable_adapter_layers(self) -> None:
        """Until `enable_adapter_layers()`, the model computes as the bare base model (PEFT's tuner call)."""
        self._owner._set_adapters_disabled(True)

    def enable_adapter_layers(self) -> None:
        self._owner._set_adapters_disabled(False)

    def delete_adapter(self, adapter_name: str) -> None:
        self._owner.delete_adapter(adapter_name)

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        return self._owner.merge_and_unload(*args, **kwargs)

    def unload(self) -> nn.Module:
        return self._owner.unload()

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        self._owner.add_weighted_adapter(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_owner"):
                raise
        call = self._owner._tuner_call(name)
        return call if call is not None else getattr(self.model, name)
