"""PEFT's `get_layer_status` / `get_model_status`: the state of every adapter layer (enabled, active, merged,
trainable, devices), and of the model as a whole, with PEFT's fields and its "irregular" for layers that disagree."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..core.layer import AdapterLayer
from ..core.model import PeftModel
from ..core.modules_to_save import ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular = None


def _same(values) -> bool | Irregular:
    values = list(values)
    return True if all(v is True for v in values) else False if all(v is False for v in values) else "irregular"


def _adapter_params(module, adapter: str) -> list[nn.Parameter]:
    if isinstance(module, AdapterLayer):
        return [t for t in module.adapter_tensors(adapter).values() if isinstance(t, nn.Parameter)]
    return list(module.modules_to_save[adapter].parameters())


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One status per adapter layer (and modules_to_save copy) of a PeftModel or of a model with adapters injected
    (inject_adapter_in_model); ValueError when there is none, as in PEFT."""
    if isinstance(model, PeftModel) and model._tuner() is None:
        raise ValueError("get_layer_status() got an invalid PeftModel instance; prefix tuning and adaption prompt "
                         "are not supported.")
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    out = []
    for name, module in root.named_modules():
        if not isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            continue
        adapters = list(module.adapter_names)
        params = {a: _adapter_params(module, a) for a in adapters}
        active = module.active_adapters if isinstance(module, AdapterLayer) else (
            [module.active_adapter] if module.active_adapter else [])
        out.append(TunerLayerStatus(
            name=name, module_type=type(module).__name__, enabled=not module.disabled,
            active_adapters=list(active),
            merged_adapters=list(module.merged_adapters) if isinstance(module, AdapterLayer) else [],
            requires_grad={a: _same(p.requires_grad for p in ps) for a, ps in params.items()},
            available_adapters=adapters,
            devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items()}))
    if not out:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you "
                         "have PEFT adapters injected in the model.")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model-wide summary of `get_layer_status`, as PEFT computes it."""
    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_type, adapter_type = type(model.get_base_model()).__name__, type(model.base_model).__name__
        peft_types = {k: c.peft_type for k, c in model.peft_config.items()}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        from transformers import PreTrainedModel

        base_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        adapter_type, peft_types = "None", {}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged_all = set().union(*(s.merged_adapters for s in layers))
    merged: list[str] | Irregular = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    grads, devices = collections.defaultdict(list), collections.defaultdict(list)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
        for k, v in s.devices.items():
            devices[k].extend(v)
    return TunerModelStatus(
        base_model_type=base_type, adapter_model_type=adapter_type, peft_types=peft_types,
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else ("irregular" if active else []),
        merged_adapters=merged, requires_grad={k: _same(v) for k, v in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={k: sorted(set(v)) for k, v in devices.items()})
