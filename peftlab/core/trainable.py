"""What an adapter trains, and the training-time hooks the loop calls: the training half of PeftModel.

`TrainableMixin` is a base of `PeftModel` (core/model.py), as `SaveLoadMixin` (core/save_load.py) is; it reads the
wrapped model through PeftModel's own methods (`_wrappers`, `adapter_layers`, `method_of`, `peft_config`, ...).
Nothing here names a method: `param_groups`, `on_step`, `extra_loss` and `prepare` come from each active adapter's
registered `Method`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..io import adapter_files


class TrainableMixin:
    # ---- trainable parameters -------------------------------------------------------------------------

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Every tensor adapter `adapter_name` owns, under its file key (PEFT layout, name stripped)."""
        self._check_known(adapter_name)
        prefix = adapter_files.KEY_PREFIX
        out: dict[str, torch.Tensor] = {}
        for path, wrapper in self._wrappers():
            if adapter_name in wrapper.adapter_names:
                for suffix, tensor in wrapper.adapter_tensors(adapter_name).items():
                    out[f"{prefix}{path}.{suffix}"] = tensor
        for name, param in self._trained_biases(adapter_name):
            out[f"{prefix}{name}"] = param
        for name, param in self._base_tensors_of(adapter_name).items():
            out[f"{prefix}{name}"] = param
        shared = self._shared_of(adapter_name)
        if shared and self.method_of(adapter_name).saves_shared(self.peft_config[adapter_name]):
            # The store is `base_model.<name>`, its entry `base_model.<name>.<adapter>`: drop the adapter name.
            out.update({f"base_model.{name}": t for name, t in shared.items()})
        for store in self.model_module_names:  # Method.model_modules: `prompt_encoder.embedding.weight`, ...
            if adapter_name in self._modules[store]:
                module = self._modules[store][adapter_name]
                out.update({f"{store}.{k}": t for k, t in module.state_dict(keep_vars=True).items()})
        return out

    def trainable_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The part of `adapter_tensors` that trains (same keys): every parameter in it except those a layer keeps
        frozen (`AdapterLayer.trainable_tensors`, e.g. LoRA-FA's A). Shared tensors are buffers and never train."""
        frozen: set[int] = set()
        for _, layer in self.adapter_layers():
            if adapter_name in layer.adapter_names:
                keep = {id(t) for t in layer.trainable_tensors(adapter_name).values()}
                frozen.update(id(t) for t in layer.adapter_tensors(adapter_name).values() if id(t) not in keep)
        return {k: t for k, t in self.adapter_tensors(adapter_name).items()
                if isinstance(t, nn.Parameter) and id(t) not in frozen}

    def _trained_biases(self, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
        """Biases that `bias="all"` / `"lora_only"` train and save with the adapter."""
        mode = getattr(self.peft_config[adapter_name], "bias", "none")
        if mode == "none":
            return []
        model = self.get_base_model()
        if mode == "all":
            # PEFT's rule, so files match key for key: every ".bias" entry of the state dict except other adapters',
            # with this adapter's name taken out. A modules_to_save copy's bias is thus saved twice ("head.bias" and
            # "head.modules_to_save.bias"); PEFT writes and reads both.
            others = [a for a in self.peft_config if a != adapter_name]
            out = []
            for n, t in model.state_dict(keep_vars=True).items():
                if not (n == "bias" or n.endswith(".bias")) or any(f".{a}." in n for a in others):
                    continue
                head, _, leaf = n.rpartition(".")  # the adapter name, if any, is the segment before the leaf
                out.append((f"{head.removesuffix(f'.{adapter_name}')}.{leaf}" if head else n, t))
            return out
        return [(f"{path}.base_layer.bias", layer.base_layer.bias) for path, layer in self.adapter_layers()
                if adapter_name in layer.adapter_names and getattr(layer.base_layer, "bias", None) is not None]

    def _refresh_trainable(self) -> None:
        """Freeze everything, then unfreeze what the active, trainable adapters train (`trainable_tensors`)."""
        for p in self.parameters():  # the base model and any model-level modules (Method.model_modules)
            p.requires_grad_(False)
        for name in self._active:
            if self.peft_config[name].inference_mode:
                continue
            for t in self.trainable_tensors(name).values():
                if t.dtype in (torch.bfloat16, torch.float16):
                    # fp32 master weights whatever dtype the base was loaded in (peftlab.models.dtype): a 16-bit
                    # tensor would round most AdamW updates away. In place, so tied and shared tensors stay shared.
                    t.data = t.data.to(torch.float32)
                t.requires_grad_(True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(_weights_in(p) for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        print(trainable_parameters_line(*self.get_nb_trainable_parameters()))

    # ---- training-time hooks (declared by methods, called by the training loop) ----------------------

    def optimizer_param_groups(self, lr: float) -> list[dict]:
        """Param groups for the trainable parameters: each active adapter's method may split its own."""
        named = dict(self.named_parameters())
        by_id = {id(p): n for n, p in named.items()}
        groups: list[dict] = []
        claimed: set[int] = set()
        for adapter in self._active:
            # Keyed by id: a tensor several layers share (LoRA-drop's shared pair) is listed under each layer's key
            # but must reach the optimizer once, or it would be stepped once per layer.
            params = list({id(t): (by_id[id(t)], t) for t in self.adapter_tensors(adapter).values()
                           if isinstance(t, nn.Parameter) and t.requires_grad and id(t) not in claimed}.values())
            if not params:
                continue
            claimed.update(id(p) for _, p in params)
            groups.extend(self.method_of(adapter).param_groups(self, adapter, params, lr)
                          or [{"params": [p for _, p in params], "lr": lr}])
        rest = [p for p in named.values() if p.requires_grad and id(p) not in claimed]
        if rest:
            groups.append({"params": rest, "lr": lr})
        return groups

    def on_step(self, step: int) -> None:
        """Call after every optimizer step: runs each active method's per-step hook."""
        for adapter in self._active:
            self.method_of(adapter).on_step(self, adapter, step)

    def extra_loss(self) -> torch.Tensor | None:
        """Sum of the active methods' regularisers, or None when no method has one."""
        terms = [t for a in self._active if (t := self.method_of(a).extra_loss(self, a)) is not None]
        return sum(terms) if terms else None

    def prepare(self, run) -> list[str]:
        """Call before the main training, before its optimizer is built: runs each active method's `prepare` hook (a
        phase of its own, e.g. LoRA-drop's layer selection; `run` is peftlab.train.prepare.PrepareRun). Returns the
        Markdown notes the hooks returned, for the model card."""
        notes = []
        for adapter in list(self._active):
            note = self.method_of(adapter).prepare(self, adapter, run)
            if note:
                notes.append(note)
        return notes


def _weights_in(param: torch.Tensor) -> int:
    """How many weights a parameter holds: bitsandbytes' 4-bit parameters pack 2 x (storage bytes) per element, counted
    as PEFT counts them (by class name: bitsandbytes is not imported for this)."""
    if type(param).__name__ != "Params4bit":
        return param.numel()
    storage = getattr(param, "quant_storage", None)
    return param.numel() * 2 * (param.element_size() if hasattr(param, "element_size") else
                                storage.itemsize if storage is not None else 1)


def trainable_parameters_line(trainable: int, total: int) -> str:
    """PEFT's print_trainable_parameters text."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
