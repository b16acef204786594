"""Adapters on a plain model: PEFT's `inject_adapter_in_model`, and transformers' adapter calls
(`model.add_adapter(config, adapter_name=...)`, `model.load_adapter(path, adapter_name=...)`, `model.set_adapter`,
...) with peftlab configs, after one line of setup: `add_adapter_api(model)`.

transformers' own calls (its PeftAdapterMixin) import `peft` and accept only `peft.PeftConfig`; `add_adapter_api`
puts peftlab's versions on this one model instance instead (nothing global is patched). In both cases the adapters are
injected into the model itself: its parameter names read `<module path>.lora_A.<adapter>.weight`, as with PEFT. The
bookkeeping lives in a PeftModel kept in the model's `__dict__` (not a submodule: the model's state dict and
`.to()` are unchanged). Methods that keep modules or tensors at model level (prompt learning, VeRA's shared
projections) need a PeftModel and are refused, as PEFT's inject_adapter_in_model refuses prompt learning.
"""

from __future__ import annotations

import types

from torch import nn

from ..core.config import AdapterConfig
from ..core.method import method_for_config
from ..core.model import PeftModel

OWNER_KEY = "_peftlab_adapters"  # model.__dict__ key of the PeftModel that keeps this model's adapters' bookkeeping


def _check_injectable(config: AdapterConfig) -> None:
    method = method_for_config(config)
    if method.model_modules is not None or method.shared_tensors is not None or not method.layers:
        raise ValueError(f"{method.name} adapters cannot be injected into a plain model: the method keeps modules or "
                         "tensors beside the model's layers, which only a PeftModel holds. Use "
                         "get_peft_model(model, config) instead.")


def _owner(model: nn.Module) -> PeftModel | None:
    return model.__dict__.get(OWNER_KEY)


def _add(model: nn.Module, config: AdapterConfig, adapter_name: str) -> PeftModel:
    """Inject adapter `adapter_name` into `model` itself; the first one creates the bookkeeping PeftModel."""
    _check_injectable(config)
    owner = _owner(model)
    if owner is None:
        owner = PeftModel(model, config, adapter_name)
        model.__dict__[OWNER_KEY] = owner
    else:
        owner.add_adapter(adapter_name, config)
    return owner


def inject_adapter_in_model(peft_config: AdapterConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> nn.Module:
    """PEFT's: put adapter layers for `peft_config` into `model` in place (no PeftModel around it), the adapter
    active and trainable, every other parameter frozen; returns `model`."""
    owner = _add(model, peft_config, adapter_name)
    owner.set_adapter(adapter_name)
    return model


def add_adapter_api(model: nn.Module) -> nn.Module:
    """Give this model transformers' adapter calls for peftlab configs (the module docstring); returns it.

    model.add_adapter(config, adapter_name="default")  inject and activate (transformers')
    model.load_adapter(path, adapter_name=None, is_trainable=False)  a saved adapter folder (ours or PEFT's), made the
                                    active one; the model in eval mode unless is_trainable
    model.set_adapter(name or [names]); model.disable_adapters(); model.enable_adapters(); model.active_adapters()
    model.delete_adapter(name or [names]); model.get_adapter_state_dict(name=None)  (PEFT's file keys)
    """
    for fn in (add_adapter, load_adapter, set_adapter, disable_adapters, enable_adapters, active_adapters,
               delete_adapter, get_adapter_state_dict):
        setattr(model, fn.__name__, types.MethodType(fn, model))
    return model


def _loaded(model: nn.Module) -> PeftModel:
    owner = _owner(model)
    if owner is None:
        raise ValueError("No adapter loaded. Please load an adapter first (model.add_adapter or model.load_adapter).")
    return owner


def add_adapter(self, adapter_config: AdapterConfig, adapter_name: str | None = None) -> None:
    adapter_name = adapter_name or "default"
    owner = _owner(self)
    if owner is not None and adapter_name in owner.peft_config:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    _add(self, adapter_config, adapter_name).set_adapter(adapter_name)


def load_adapter(self, peft_model_id: str, adapter_name: str | None = None, is_trainable: bool = False,
                 adapter_state_dict: dict | None = None, **kwargs) -> None:
    from ..core.save_load import read_config
    from ..io import adapter_files

    adapter_name = adapter_name or "default"
    owner = _owner(self)
    if owner is not None and adapter_name in owner.peft_config:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    folder = adapter_files.resolve_adapter_dir(peft_model_id, kwargs.get("subfolder"), kwargs.get("revision"))
    config = read_config(folder)
    config.inference_mode = not is_trainable
    _check_injectable(config)
    weights = adapter_state_dict if adapter_state_dict is not None else adapter_files.read_weights(folder)
    if owner is None:
        owner = _add(self, config, adapter_name)  # the first adapter is the active one
        try:
            owner.load_tensors(adapter_name, weights, folder)
        except Exception:
            owner.unload()
            del self.__dict__[OWNER_KEY]
            raise
    else:
        owner.load_adapter(folder, adapter_name, is_trainable=is_trainable, config=config)
    owner.set_adapter(adapter_name)  # as transformers' (its PEFT injection activates the new adapter)
    if not is_trainable:
        self.eval()


def set_adapter(self, adapter_name: str | list[str]) -> None:
    _loaded(self).set_adapter(adapter_name)


def disable_adapters(self) -> None:
    _loaded(self)._set_adapters_disabled(True)


def enable_adapters(self) -> None:
    _loaded(self)._set_adapters_disabled(False)


def active_adapters(self) -> list[str]:
    return _loaded(self).active_adapters


def delete_adapter(self, adapter_names: str | list[str]) -> None:
    owner = _loaded(self)
    for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
        if list(owner.peft_config) == [name]:  # the last one: the model goes back to its plain self
            owner.unload()
            del self.__dict__[OWNER_KEY]
            return
        owner.delete_adapter(name)


def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
    from ..core.save_load import get_peft_model_state_dict
    from ..io.adapter_files import KEY_PREFIX

    owner = _loaded(self)
    tensors = get_peft_model_state_dict(owner, state_dict, adapter_name or owner.active_adapters[0])
    # keys as the model itself names them (PEFT's on a plain model): no PeftModel prefix
    return {k.removeprefix(KEY_PREFIX): t for k, t in tensors.items()}
