"""Adapter files for the wrapped model: `save_pretrained`, `from_pretrained`, `load_adapter`, and PEFT's module-level
helpers on the same code (`get_peft_model_state_dict`, `set_peft_model_state_dict`, `load_peft_weights`).

`SaveLoadMixin` is one of `PeftModel`'s bases (core/model.py); it reads the model only through `PeftModel`'s own
methods (`adapter_tensors`, `method_of`, `get_base_model`, ...). Folders are HF PEFT's layout (io/adapter_files.py).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..io import adapter_files
from ..io.names import check_adapter_name
from .config import AdapterConfig
from .layer import AdapterLayer
from .method import method_for_peft_type
from .modules_to_save import ModulesToSaveWrapper
from .targets import ALL_LINEAR, matches

# PEFT's names of embedding layers: targeting one makes save_pretrained (save_embedding_layers="auto") save
# the embedding layer's own weights too.
EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]

if TYPE_CHECKING:  # the class this mixin is a base of (core/model.py), for annotations only
    from .model import PeftModel


class SaveLoadMixin:
    """The file half of `PeftModel` (see the module docstring)."""

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True, save_embedding_layers: bool | str = "auto",
                        **_ignored) -> None:
        """Write each adapter as adapter_config.json + adapter_model.safetensors (HF PEFT layout).
        The adapter named "default" goes in `save_directory`, any other in `save_directory/<name>/`.
        `save_embedding_layers` (PEFT's): also save the input/output embedding layers' own weights; "auto" does
        so when an embedding layer ("embed_tokens", "lm_head") is a LoRA target, as PEFT does."""
        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False) asks for a pickle file (adapter_model.bin), "
                             "which can run code when loaded; peftlab writes safetensors only. Leave "
                             "safe_serialization at its default (True).")
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory!r} is a file; save_pretrained needs a folder path.")
        for name in selected_adapters or list(self.peft_config):
            self._check_known(name)
            check_adapter_name(name)  # also for names set before this check existed (e.g. a loaded pickle)
            folder = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            # The config's text before any file changes: a value JSON cannot hold must not leave new weights
            # beside the old config.
            # inference_mode=True in the file, as PEFT writes it (loaders set it from is_trainable anyway).
            config_text = dataclasses.replace(self.peft_config[name], inference_mode=True).to_json_string()
            tensors = self.adapter_state_dict(name, save_embedding_layers)
            adapter_files.write_adapter_folder(folder, config_text, tensors)  # config + weights swapped in as one

    def adapter_state_dict(self, adapter_name: str = "default", save_embedding_layers: bool | str = "auto"
                           ) -> dict[str, torch.Tensor]:
        """{file key: tensor} exactly as `save_pretrained` writes adapter `adapter_name` (PEFT's
        `get_peft_model_state_dict`): its tensors, any saved embedding layers, in the method's own file layout."""
        self._check_known(adapter_name)
        tensors = self.adapter_tensors(adapter_name)
        tensors.update(self._embedding_layers_to_save(adapter_name, save_embedding_layers))
        return self.method_of(adapter_name).to_file(self, adapter_name, tensors)

    def _embedding_layers_to_save(self, adapter_name: str, save: bool | str) -> dict[str, torch.Tensor]:
        """PEFT's `save_embedding_layers`: the base embedding layers' weights, saved beside the adapter. With
        "auto" PEFT saves them when an embedding layer is targeted (only the targeted, wrapped ones); we do the
        same so that files match key for key. (PEFT's other "auto" case, a vocabulary resized since the base
        checkpoint, needs the base config from the hub and is not detected here: pass True.)"""
        targets = self.peft_config[adapter_name].target_modules
        if isinstance(targets, str):
            targeted = targets != ALL_LINEAR and any(
                matches(n, targets) for n, _ in self.get_base_model().named_modules()
                if n.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES)
        else:
            targeted = any(t in EMBEDDING_LAYER_NAMES for t in targets or [])
        if save == "auto":
            save = targeted
        if not save:
            return {}
        return {k: t for k, (t, wrapped) in self._embedding_layer_tensors().items() if wrapped or not targeted}

    def _embedding_layer_tensors(self) -> dict[str, tuple[torch.Tensor, bool]]:
        """{file key: (tensor, is it LoRA-wrapped)} for the input and output embedding layers' own tensors; a
        wrapped layer's live under `<path>.base_layer.` (PEFT's keys)."""
        model = self.get_base_model()
        out: dict[str, tuple[torch.Tensor, bool]] = {}
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            fn = getattr(model, getter, None)
            layer = fn() if callable(fn) else None
            if layer is None or isinstance(layer, ModulesToSaveWrapper):  # a saved copy is in the file already
                continue
            wrapped = isinstance(layer, AdapterLayer)
            module = layer.base_layer if wrapped else layer
            path = next((n for n, m in model.named_modules() if m is module), None)
            if path is None:
                continue
            for key, tensor in module.state_dict(keep_vars=True).items():
                out[f"{adapter_files.KEY_PREFIX}{path}.{key}"] = (tensor, wrapped)
        return out

    def load_tensors(self, adapter_name: str, found: dict[str, torch.Tensor], source: str) -> None:
        """Copy a file's tensors ({file key: tensor}, e.g. `io.adapter_files.read_weights(folder)`) into the existing
        adapter `adapter_name`; `source` names the file in errors. Used by from_pretrained / load_adapter and by
        callers that read files themselves (checkpoint resume, `peftlab eval`). Embedding-layer weights saved with it
        (PEFT's save_embedding_layers) go into the base embedding layers, as PEFT loads them. Everything is checked
        before anything is copied (AdapterFileError names every missing, unexpected or misshapen tensor). The
        method's `load_targets` may add tensors its files carry beyond the adapter's own, and its `after_load` runs
        once everything is in place."""
        method = self.method_of(adapter_name)
        found = method.from_file(self, adapter_name, found)  # the method's file layout -> adapter_tensors keys
        expected = self.adapter_tensors(adapter_name)
        expected.update(method.load_targets(self, adapter_name, found) or {})
        base = self._embedding_layer_tensors()
        found = dict(found)
        embeddings = {k: found.pop(k) for k in list(found) if k in base and k not in expected}
        embedding_targets = {k: base[k][0] for k in embeddings}
        adapter_files.check_fits(embedding_targets, embeddings, source)  # load_into checks the adapter's own
        adapter_files.load_into(expected, found, source)
        adapter_files.load_into(embedding_targets, embeddings, source)
        method.after_load(self, adapter_name)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        subfolder: str | None = None, revision: str | None = None, allow_non_finite: bool = False,
                        **_ignored) -> "PeftModel":
        """Load an adapter folder (ours or HF PEFT's) onto `model`; returned in eval mode unless `is_trainable` (as in
        PEFT), as the task class of the config's task_type when called on PeftModel itself. Weights holding NaN/inf
        are refused unless `allow_non_finite=True`."""
        check_adapter_name(adapter_name)
        folder = adapter_files.resolve_adapter_dir(model_id, subfolder, revision)
        config = config or read_config(folder)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        weights = adapter_files.read_weights(folder, allow_non_finite)  # read before touching the model: fail early
        peft_model = cls._class_for_task(config.task_type)(model, config, adapter_name)
        try:
            peft_model.load_tensors(adapter_name, weights, folder)
        except Exception:
            peft_model.unload()  # hand the caller's model back as it was, without wrappers injected into it
            raise
        if not is_trainable:  # PEFT's: an adapter loaded for inference runs without dropout
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, revision: str | None = None,
                     config: AdapterConfig | None = None, allow_non_finite: bool = False, **_ignored) -> None:
        """Load another adapter folder onto this model under `adapter_name` (not activated; an existing adapter of that
        name takes the folder's weights, as in PEFT). `config`, as in
        `from_pretrained`, replaces the folder's own: e.g. a QLoRA adapter's file reads as plain LoRA, and a second
        QLoRA adapter needs `config=QLoraConfig.from_lora(read_config(folder))` to join the 4-bit layers."""
        check_adapter_name(adapter_name)
        folder = adapter_files.resolve_adapter_dir(model_id, subfolder, revision)
        config = dataclasses.replace(config or read_config(folder), inference_mode=not is_trainable)
        weights = adapter_files.read_weights(folder, allow_non_finite)
        if adapter_name in self.peft_config:  # PEFT's: an existing adapter takes the folder's weights (a resume)
            if type(config) is not type(self.peft_config[adapter_name]):
                raise adapter_files.AdapterFileError(
                    f"{folder} holds a {type(config).__name__} adapter but {adapter_name!r} here is a "
                    f"{type(self.peft_config[adapter_name]).__name__}; load it under another adapter_name.")
            self.load_tensors(adapter_name, weights, folder)  # checks every tensor before copying any
            if not is_trainable:
                self.eval()
            return
        self.add_adapter(adapter_name, config)
        try:
            self.load_tensors(adapter_name, weights, folder)
        except Exception:
            self.delete_adapter(adapter_name)  # leave the model as it was
            raise
        if not is_trainable:  # as PEFT's load_adapter: the whole model in eval mode (dropout off)
            self.eval()


def read_config(folder: str) -> AdapterConfig:
    return config_from_dict(adapter_files.read_config_dict(folder), f"{folder}/adapter_config.json")


def config_from_dict(data: dict, source: str = "the config") -> AdapterConfig:
    """The config of the method whose peft_type (and claims) `data` carries (PEFT's get_peft_config)."""
    if "peft_type" not in data:
        raise adapter_files.AdapterFileError(f"{source} has no peft_type; it is not an adapter config.")
    method = method_for_peft_type(data["peft_type"], data)
    return method.config_cls.from_dict(data, source=source)


def config_as_trained(file_config: AdapterConfig, trained: AdapterConfig | None) -> AdapterConfig:
    """The config to load an adapter file with, given the config its run trained it with (`trained`, e.g. a run's
    `method`; None: unknown). Where the training method's config class refines the file's (QLoRA writes plain LoRA
    files: a QLoraConfig is a LoraConfig), the refined class with the file's values for every field the file holds and
    the run's for the rest (QLoRA's blocksize, double quant), so that loading joins the layers the adapter was trained
    on (4-bit ones) instead of plain ones. Otherwise the file's config as it is: it holds everything."""
    if trained is None:
        return file_config
    file_cls, cls = type(file_config), type(trained)
    if cls is file_cls or not issubclass(cls, file_cls):
        return file_config
    kept = {f.name: getattr(file_config, f.name) for f in dataclasses.fields(file_cls) if f.init}
    extra = {f.name: getattr(trained, f.name) for f in dataclasses.fields(cls) if f.init and f.name not in kept}
    return cls(**kept, **extra)




# ---- PEFT's module-level helpers ----------------------------------------------------------------------------------

class IncompatibleKeys(NamedTuple):
    """What `set_peft_model_state_dict` returns, as torch's `load_state_dict(strict=False)` (PEFT returns that):
    the model's state-dict names left as they were, and the given keys that fit nothing."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def get_peft_model_state_dict(model, state_dict: dict | None = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers: bool | str = "auto"
                              ) -> dict[str, torch.Tensor]:
    """PEFT's helper: adapter `adapter_name`'s {file key: tensor}, what `save_pretrained` writes. `state_dict`
    (PEFT's: a state dict of the model to read the values from instead of the live tensors) is looked up by each
    tensor's name in the model."""
    model = getattr(model, "_orig_mod", model) if unwrap_compiled else model
    tensors = model.adapter_state_dict(adapter_name, save_embedding_layers)
    if state_dict is None:
        return tensors
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    return {k: state_dict[names[id(t)]] if names.get(id(t)) in state_dict else t for k, t in tensors.items()}


def set_peft_model_state_dict(model, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False
                              ) -> IncompatibleKeys:
    """PEFT's helper: copy a {file key: tensor} dict (a file's, or `get_peft_model_state_dict`'s) into adapter
    `adapter_name`. Lenient like PEFT's (torch's strict=False): adapter tensors absent from the dict keep their values
    (a warning names them) and keys that fit nothing are returned as unexpected; a tensor of another shape raises
    (skipped with ignore_mismatched_sizes=True, as in PEFT)."""
    method = model.method_of(adapter_name)
    found = method.from_file(model, adapter_name, dict(peft_model_state_dict))
    expected = model.adapter_tensors(adapter_name)
    expected.update(method.load_targets(model, adapter_name, found) or {})
    embeddings = {k: t for k, (t, _) in model._embedding_layer_tensors().items() if k not in expected}
    targets = {**expected, **{k: t for k, t in embeddings.items() if k in found}}
    wrong = [k for k in targets if k in found and found[k].shape != targets[k].shape]
    if wrong and not ignore_mismatched_sizes:
        k = wrong[0]
        raise adapter_files.AdapterFileError(
            f"set_peft_model_state_dict: {len(wrong)} tensor(s) have other shapes than adapter {adapter_name!r}'s, "
            f"e.g. {k}: given {tuple(found[k].shape)} vs model {tuple(targets[k].shape)}. Pass the state dict of an "
            "adapter made for this model and config (or ignore_mismatched_sizes=True to skip them).")
    loaded = {k: t for k, t in targets.items() if k in found and k not in wrong}
    with torch.no_grad():
        for key, target in loaded.items():
            target.copy_(found[key].to(dtype=target.dtype, device=target.device))
    left = sorted(set(expected) - set(loaded))
    if left:
        warnings.warn(f"set_peft_model_state_dict: {len(left)} tensor(s) of adapter {adapter_name!r} were not in the "
                      f"state dict and keep their values: {adapter_files._few(left)}.", stacklevel=2)
    method.after_load(model, adapter_name)
    done = {id(t) for t in loaded.values()}
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if id(t) not in done]
    return IncompatibleKeys(missing, sorted(set(found) - set(targets)))


def load_peft_weights(model_id: str | os.PathLike, device: str | None = None, **hf_hub_download_kwargs
                      ) -> dict[str, torch.Tensor]:
    """PEFT's helper: an adapter folder's (or hub repo's) weights as {file key: tensor}, on `device` (default CPU).
    safetensors only."""
    folder = adapter_files.resolve_adapter_dir(model_id, hf_hub_download_kwargs.get("subfolder"),
                                               hf_hub_download_kwargs.get("revision"))
    weights = adapter_files.read_weights(folder)
    return {k: t.to(device) for k, t in weights.items()} if device else weights
