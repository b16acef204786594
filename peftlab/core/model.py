"""The wrapped model: a base transformer with one or more named adapters injected into it.

Layout (as HF PEFT's, so parameter names and state dicts match PEFT's):
    PeftModel
      .base_model : TunerModel        # holds the adapters' bookkeeping
          .model  : the user's model  # with target modules replaced by AdapterLayer wrappers
Parameter names therefore read `base_model.model.<module path>.lora_A.default.weight`. A model whose first adapter
acts on the inputs only (prompt learning) keeps the user's model itself as `.base_model`, as PEFT does
(`base_model.<module path>`). Task classes (`PeftModelForCausalLM`, ...) are PEFT's; `get_peft_model` returns them.
Its halves, bases of PeftModel: core/trainable.py (what trains, the training hooks), core/merge.py (merge, unload,
combine), core/save_load.py (files). The tuner model: core/tuner.py.

Nothing here names a method: everything method-specific comes from the `Method` registered for the
config's class (see core/method.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..io.names import check_adapter_name
from .config import AdapterConfig, ConfigError, TaskType
from .layer import AdapterLayer
from .merge import MergeMixin
from .method import Method, method_for_config, registered_methods
from .modules_to_save import ModulesToSaveWrapper
from .save_load import SaveLoadMixin, read_config  # noqa: F401  (read_config: re-exported, as before the split)
from .targets import ALL_LINEAR, matches, resolve_target_spec, select_targets
from .trainable import TrainableMixin, trainable_parameters_line  # noqa: F401  (re-exported: train/ reads it here)
from .tuner import SharedTensors, TunerModel

# Heads a task adds to modules_to_save (if the model has them), as PEFT does.
TASK_HEADS = {
    TaskType.SEQ_CLS: ["classifier", "score"],
    TaskType.TOKEN_CLS: ["classifier", "score"],
    TaskType.QUESTION_ANS: ["qa_outputs"],
}


def _peft_forward(self, *args, **kwargs):
    hooked = self._input_hook_adapter()
    if hooked is not None:  # an input-side method (prompt/prefix tuning) runs the base model itself
        kwargs = _bind_to_names(self.get_base_model().forward, args, kwargs)
        return self.method_of(hooked).forward(self, hooked, kwargs)
    return self.get_base_model()(*args, **kwargs)


class _BaseSignatureForward:
    """`PeftModel.forward`. Called on a model it runs `fn`; `inspect.signature` of it gives the wrapped model's own
    forward parameters. transformers.Trainer keeps only the dataset columns that signature names (its default
    remove_unused_columns=True) and reads PEFT's models' base signature the same way, so the same columns reach the
    model. On the class it is `fn` itself, whose named parameters (a task class's, PEFT's) Trainer's find_labels reads.
    Deliberately no `__func__`: accelerate's autocast wrapping then wraps this object, signature included."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __get__(self, model, owner=None):
        return self.fn if model is None else _BoundForward(self.fn, model)


class _BoundForward:
    __slots__ = ("fn", "model")

    def __init__(self, fn, model) -> None:
        self.fn, self.model = fn, model

    def __call__(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.model.get_base_model().forward)


class PeftModel(TrainableMixin, MergeMixin, SaveLoadMixin, nn.Module):
    """A base model plus named adapters. Create with `get_peft_model` or `PeftModel.from_pretrained`."""

    # transformers' flag for "trainable adapters are attached": its Trainer refuses a quantised model without it
    # (PEFT's models pass that check by class, which ours cannot).
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        # PEFT's layouts: a first adapter that acts on the inputs only (prompt learning: model-level modules, no layers)
        # keeps the user's model itself as `base_model` (names `base_model.<path>`), any other a tuner model around
        # it (`base_model.model.<path>`).
        first = method_for_config(peft_config)
        self.base_model = model if first.model_modules is not None and not first.layers else TunerModel(model, self)
        self.peft_config: dict[str, AdapterConfig] = {}
        self._active: list[str] = []
        self.model_module_names: list[str] = []  # ModuleDicts of Method.model_modules, e.g. "prompt_encoder"
        self._input_hooks_disabled = False  # set by disable_adapter(): Method.forward / generate hooks are skipped
        _check_not_wrapped(model)
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)
        model.__dict__[WRAPPED_MARK] = True  # until unload/merge_and_unload hands the model back
        # PEFT's rule: checkpointed layers need inputs that require grad, or the adapters inside get none. (transformers
        # 5 names the flag is_activation_checkpointing and warns on the old one; a model without either: True.)
        new_name = hasattr(type(model), "is_activation_checkpointing")
        if getattr(model, "is_activation_checkpointing" if new_name else "is_gradient_checkpointing", True):
            _inputs_require_grad(model)

    # ---- pass-through to the base model -------------------------------------------------------------

    forward = _BaseSignatureForward(_peft_forward)

    def generate(self, *args, **kwargs):
        hooked = self._input_hook_adapter()
        if hooked is not None:
            kwargs = _bind_to_names(self.get_base_model().generate, args, kwargs)
            return self.method_of(hooked).generate(self, hooked, kwargs)
        return self.get_base_model().generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.get_base_model(), name)

    def get_base_model(self) -> nn.Module:
        base = self.base_model
        return base.model if isinstance(base, TunerModel) else base

    def _tuner(self) -> TunerModel | None:
        return self.base_model if isinstance(self.base_model, TunerModel) else None

    @classmethod
    def _class_for_task(cls, task_type) -> type["PeftModel"]:
        """PEFT's rule for PeftModel.from_pretrained: called on PeftModel itself, the task class of the task_type."""
        return TASK_CLASSES.get(task_type, cls) if cls is PeftModel else cls

    def _tuner_call(self, name: str):
        """`base_model.<name>` for a method's own tuner call (Method.tuner_calls), bound to the active adapters of
        the methods that offer it; None when no registered method offers `name`."""
        if not any(name in m.tuner_calls for m in registered_methods()):
            return None
        owners = [a for a in self._active if name in self.method_of(a).tuner_calls]
        if not owners:
            active = ", ".join(f"{a!r} ({self.method_of(a).name})" for a in self._active) or "none"
            offered = sorted(m.name for m in registered_methods() if name in m.tuner_calls)
            raise AttributeError(f"{name} is a call of {', '.join(offered)} adapters, and the active adapters are "
                                 f"{active}: it has nothing to act on here. Call it on a model whose active adapter "
                                 f"is {offered[0]}.")

        def call(*args, **kwargs):
            for adapter in owners:
                self.method_of(adapter).tuner_calls[name](self, adapter, *args, **kwargs)
        return call

    # ---- walking the wrappers -------------------------------------------------------------------------

    def _wrappers(self) -> Iterator[tuple[str, AdapterLayer | ModulesToSaveWrapper]]:
        """(path inside the user's model, wrapper) for every adapter layer and modules_to_save wrapper."""
        for name, module in self.get_base_model().named_modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield name, module

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """(path inside the user's model, layer) for every injected AdapterLayer, whatever adapters it holds (filter
        on `layer.adapter_names`); modules_to_save copies are not included. Methods walk their layers with it (LoRA's
        combine, AdaLoRA's budget, Delta-LoRA's base update, LoRA-drop's selection)."""
        return ((n, m) for n, m in self._wrappers() if isinstance(m, AdapterLayer))

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; this model has: {sorted(self.peft_config)}.")

    def method_of(self, adapter_name: str) -> Method:
        self._check_known(adapter_name)
        return method_for_config(self.peft_config[adapter_name])

    # ---- adding, switching, deleting ------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig) -> None:
        """Inject a new adapter (not yet active: call `set_adapter` to use it)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; delete it first or pick another name.")
        check_adapter_name(adapter_name)
        method = method_for_config(peft_config)
        model = self.get_base_model()
        if method.base_tensors is not None:
            others = [a for a in self.peft_config if self.method_of(a).base_tensors is not None]
            if others:
                raise ValueError(
                    f"{method.name} trains base-model weights in place, and adapter {others[0]!r} "
                    f"({self.method_of(others[0]).name}) already does: two such adapters would train the same "
                    "tensors. Delete it first, or use a separate copy of the base model.")
        config = self._complete_config(method.complete_config(model, peft_config), model)
        try:
            skip = tuple(f"{n}." for n, _ in self._wrappers())
            self._add_modules_to_save(adapter_name, config, model, skip)
            skip = tuple(f"{n}." for n, _ in self._wrappers()) + tuple(n for n, m in self._wrappers()
                                                                       if isinstance(m, ModulesToSaveWrapper))
            # A method without layers (full fine-tuning, BitFit, prompt tuning, ...) wraps no module: nothing to
            # target, and target_modules stays as given (None).
            spec = resolve_target_spec(config, model, method.default_targets, method.name) if method.layers else []
            chosen = select_targets(model, config, spec, skip) if method.layers else []
            # Every target is checked before any is wrapped: wrapping may change a base layer in a way removing the
            # adapter cannot undo (QLoRA quantises it), so a bad target found half way must not leave that behind.
            for name in chosen:
                self._check_injectable(model, name, method)
            for name in chosen:
                self._inject_one(model, name, adapter_name, config, method)
            if method.shared_tensors is not None:
                self._add_shared(adapter_name, config, method)
            if method.model_modules is not None:
                self._add_model_modules(adapter_name, config, method)
        except BaseException:
            # A target that fails half way (e.g. one of the matches is a LayerNorm) must not leave the modules
            # before it carrying a half-added adapter.
            self._remove_from_modules(adapter_name)
            raise
        if method.layers and (config.target_modules is None or config.target_modules == ALL_LINEAR):
            # Record what was resolved, as PEFT does (its files never hold null or "all-linear"): the file then says
            # what it adapts (vLLM reads target_modules), PEFT reads it even beside layers_to_transform, and a later
            # change of defaults cannot change what a saved file loads.
            config = dataclasses.replace(config, target_modules=spec if config.target_modules is None else chosen)
        self.peft_config[adapter_name] = config
        self._refresh_trainable()

    # ---- input-side methods: model-level modules and the forward/generate hook (Method.model_modules / forward) --

    def _add_model_modules(self, adapter_name: str, config: AdapterConfig, method: Method) -> None:
        """Keep the method's model-level modules for this adapter at `self.<store>[adapter_name]` (PEFT's
        `prompt_encoder.default`). A store is an nn.ModuleDict registered on this model, so it moves with `.to()`."""
        if method.forward is not None and method.generate is None:
            raise TypeError(f"Method {method.name!r} has a forward hook but no generate hook; give it both.")
        for name, module in method.model_modules(self, adapter_name, config).items():
            store = self._modules.get(name)
            if store is None:
                if not name.isidentifier() or name in self.__dict__ or name in self._modules or \
                        name in self._parameters or name in self._buffers or hasattr(type(self), name):
                    raise ValueError(
                        f"{method.name}'s model_modules returned the name {name!r}, which cannot be an attribute of "
                        f"the wrapped model (not an identifier, or taken). Rename it in the method's hook.")
                store = nn.ModuleDict()
                self.add_module(name, store)
                self.model_module_names.append(name)
            store[adapter_name] = module

    def _remove_model_modules(self, adapter_name: str) -> None:
        for name in list(self.model_module_names):
            store = self._modules[name]
            if adapter_name in store:
                del store[adapter_name]
            if not len(store):  # the last adapter that had one: drop the store itself
                del self._modules[name]
                self.model_module_names.remove(name)

    def _check_one_input_hook(self, names: list[str]) -> None:
        hooked = [n for n in names if self.method_of(n).forward is not None]
        if len(hooked) > 1:
            methods = ", ".join(self.method_of(n).name for n in hooked)
            raise ValueError(
                f"Adapters {hooked} each rewrite the model's inputs ({methods}), and only one such adapter can be "
                "active at a time (peftlab does not stack virtual tokens or "
                f"prefixes of several adapters). Activate one of them, e.g. set_adapter({hooked[0]!r}).")

    def _input_hook_adapter(self) -> str | None:
        """The active adapter whose method runs the forward itself (Method.forward), or None: none is active, or
        adapters are disabled."""
        if self._input_hooks_disabled:
            return None
        self._check_one_input_hook(self._active)
        return next((n for n in self._active if self.method_of(n).forward is not None), None)

    def _add_shared(self, adapter_name: str, config: AdapterConfig, method: Method) -> None:
        """Create the method's model-level tensors for this adapter and hand its layers a reference to them."""
        layers = [(n, m) for n, m in self.adapter_layers() if adapter_name in m.adapter_names]
        tensors = method.shared_tensors(self, adapter_name, config, layers)
        persistent = bool(method.saves_shared(config))
        tuner = self._tuner()
        if tuner is None:
            raise ValueError(f"{method.name} keeps model-level tensors on the tuner model, which a model whose first "
                             f"adapter is prompt learning does not have (PEFT's layout). Put the {method.name} adapter "
                             "on its own copy of the base model.")
        for name, tensor in tensors.items():
            store = tuner._modules.get(name)
            if store is None:
                if not name.isidentifier() or hasattr(tuner, name):
                    raise ValueError(
                        f"{method.name}'s shared_tensors returned the name {name!r}, which cannot be an attribute of "
                        f"the wrapped model (not an identifier, or taken). Rename it in the method's hook.")
                store = SharedTensors()
                tuner.add_module(name, store)
                tuner.shared_names.append(name)
            store.add(adapter_name, tensor, persistent)
            for _, layer in layers:
                layer.shared_stores[name] = store

    def _shared_of(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """{name: tensor} of the shared tensors adapter `adapter_name` owns."""
        tuner = self._tuner()
        return {} if tuner is None else {n: tuner._modules[n][adapter_name] for n in tuner.shared_names
                                         if adapter_name in tuner._modules[n]}

    def _base_tensors_of(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """{path in the user's model: parameter} of the base parameters adapter `adapter_name` trains in place
        (`Method.base_tensors`), less those inside modules_to_save wrappers (their per-adapter copies train)."""
        method = self.method_of(adapter_name)
        if method.base_tensors is None:
            return {}
        wrapped = {id(p) for _, w in self._wrappers() if isinstance(w, ModulesToSaveWrapper) for p in w.parameters()}
        found = method.base_tensors(self.get_base_model(), self.peft_config[adapter_name])
        return {path: p for path, p in found.items() if id(p) not in wrapped}

    def trains_base_in_place(self, adapter_names: list[str]) -> list[str]:
        """The adapters among `adapter_names` that change base weights in place (bias != "none", full or BitFit
        training, Delta-LoRA's base update): disabling or unloading them cannot give the original base back, so a task
        whose reference model is the base with adapters disabled (dpo) refuses them."""
        return [a for a in adapter_names if getattr(self.peft_config[a], "bias", "none") != "none"
                or self.method_of(a).base_tensors is not None or self.method_of(a).updates_base]

    def _complete_config(self, config: AdapterConfig, model: nn.Module) -> AdapterConfig:
        changes = {}
        heads = TASK_HEADS.get(config.task_type, [])
        present = [h for h in heads if any(matches(n, [h]) for n, _ in model.named_modules())]
        if present:
            changes["modules_to_save"] = list(dict.fromkeys((config.modules_to_save or []) + present))
        if config.base_model_name_or_path is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
            if name:
                changes["base_model_name_or_path"] = name
        return dataclasses.replace(config, **changes) if changes else dataclasses.replace(config)

    def _add_modules_to_save(self, adapter_name, config, model, skip) -> None:
        task_heads = TASK_HEADS.get(config.task_type, [])
        for entry in config.modules_to_save or []:
            hits = [n for n, _ in model.named_modules() if n and matches(n, [entry]) and not n.startswith(skip)]
            if not hits and entry in task_heads:
                # PEFT writes every head name its task knows (SEQ_CLS: "classifier" and "score"); a model has one.
                continue
            if not hits:
                leafs = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
                near = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leafs, n=3, cutoff=0.5)
                hint = f" Nearest module names present: {', '.join(near)}." if near else ""
                raise ConfigError(
                    f"modules_to_save entry {entry!r} matched no module of {type(model).__name__}.{hint} Entries "
                    f"match a module whose full name equals them or ends with '.' + entry, e.g. "
                    f"modules_to_save=[{(near or leafs or ['lm_head'])[0]!r}]."
                )
            for name in hits:
                module = model.get_submodule(name)
                if isinstance(module, AdapterLayer):
                    raise ConfigError(f"{name!r} is both an adapter target and in modules_to_save; pick one.")
                if not isinstance(module, ModulesToSaveWrapper):
                    module = ModulesToSaveWrapper(module)
                    _set_submodule(model, name, module)
                module.add_adapter(adapter_name)

    def _check_injectable(self, model, name, method) -> None:
        """Raise a ConfigError if `method` cannot put an adapter on module `name`; changes nothing."""
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            if method.wrapper_for(module.base_layer) is not type(module):
                raise ConfigError(
                    f"{name!r} already carries a {type(module).__name__} adapter; peftlab does not stack "
                    f"adapters of different methods on one module. Exclude it with exclude_modules=[{name!r}]."
                )
        elif method.wrapper_for(module) is None:
            raise ConfigError(
                f"target {name!r} is a {type(module).__name__}, which {method.name} cannot adapt (it wraps: "
                f"{method.supported_types()}). Narrow target_modules, or exclude it with exclude_modules=[{name!r}]."
            )

    def _inject_one(self, model, name, adapter_name, config, method) -> None:
        self._check_injectable(model, name, method)
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            module.add_adapter(adapter_name, config, name)
            module.train(module.base_layer.training)  # new submodules (e.g. dropout) follow the model's mode
            return
        wrapper = method.wrapper_for(module)(module)
        wrapper.add_adapter(adapter_name, config, name)
        wrapper.train(module.training)  # an eval-mode model stays in eval mode (dropout off)
        _set_submodule(model, name, wrapper)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the active ones (they alone run in forward and train)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self._check_known(n)
        self._check_one_input_hook(names)
        for _, wrapper in self._wrappers():
            wrapper.set_active(names)
        self._active = names
        self._refresh_trainable()

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else self._active  # type: ignore[return-value]

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self._remove_from_modules(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self._active if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self._active = []
        if remaining:
            self.set_adapter(remaining)

    def _remove_from_modules(self, adapter_name: str) -> None:
        self._remove_model_modules(adapter_name)
        tuner = self._tuner()
        for name in list(tuner.shared_names if tuner is not None else []):
            store = tuner._modules[name]
            store.remove(adapter_name)
            if not len(store):  # the last adapter that had it: drop the store itself
                del tuner._modules[name]
                tuner.shared_names.remove(name)
        model = self.get_base_model()
        for name, wrapper in list(self._wrappers()):
            wrapper.delete_adapter(adapter_name)
            if not wrapper.adapter_names:  # nothing left on it: put the original module back
                original = wrapper.unwrapped() if isinstance(wrapper, AdapterLayer) else wrapper.original_module
                _set_submodule(model, name, original)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this block the model computes as the bare base model (no adapter, no saved-module copy)."""
        before = [(w, w.disabled) for _, w in self._wrappers()], self._input_hooks_disabled
        self._set_adapters_disabled(True)
        try:
            yield
        finally:
            for w, was in before[0]:
                w.disabled = was
            self._input_hooks_disabled = before[1]

    def _set_adapters_disabled(self, disabled: bool) -> None:
        """Switch every adapter off (the bare base model computes) or back on; `disable_adapter()` and the tuner
        model's disable_adapter_layers / enable_adapter_layers (PEFT's) both come here."""
        if disabled and any(layer.merged for _, layer in self.adapter_layers()):
            warnings.warn("Adapters were merged; unmerging them so that the base model can run without them.")
            self.unmerge_adapter()
        in_place = self.trains_base_in_place(self._active) if disabled else []
        if in_place:
            warnings.warn(f"Adapters {in_place} train base-model weights or biases in place (bias != 'none', or a "
                          "method such as full or bitfit); disabling adapters does not undo that, so outputs differ "
                          "from the original base model.")
        for _, w in self._wrappers():
            w.disabled = disabled
        self._input_hooks_disabled = disabled

    def _unwrap(self, keep_copies: bool) -> nn.Module:
        model = self.get_base_model()
        for name, wrapper in list(self._wrappers()):
            if isinstance(wrapper, AdapterLayer):
                original = wrapper.unwrapped()
            elif keep_copies and wrapper.active_adapter is not None:
                original = wrapper.modules_to_save[wrapper.active_adapter]
            else:
                original = wrapper.original_module
            _set_submodule(model, name, original)
        model.__dict__.pop(WRAPPED_MARK, None)
        return model


def _bind_to_names(fn, args: tuple, kwargs: dict) -> dict:
    """`fn(*args, **kwargs)`'s arguments as one {name: value} dict (positional ones named by `fn`'s signature), for the
    input-side hooks, which read and rewrite inputs by name (`model(ids)` is `model(input_ids=ids)`)."""
    if not args:
        return dict(kwargs)
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise TypeError(f"{getattr(fn, '__qualname__', fn)} takes {len(params)} positional arguments, got {len(args)}.")
    named = {p.name: a for p, a in zip(params, args)}
    both = sorted(set(named) & set(kwargs))
    if both:
        raise TypeError(f"Got {both} both by position and by name; pass each once.")
    return {**named, **kwargs}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# Set on a base model while a PeftModel wraps it. A second PeftModel on the same base would inject into the same
# layers: its "default" adapter would replace the first one's, silently changing the first model's outputs.
# (HF PEFT only warns, "You are trying to modify a model with PEFT for a second time", and goes on.)
WRAPPED_MARK = "_peftlab_wrapped"


def _check_not_wrapped(model: nn.Module) -> None:
    if model.__dict__.get(WRAPPED_MARK) or any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper))
                                               for m in model.modules()):
        raise ValueError(
            "This base model is already wrapped by a PeftModel: a second get_peft_model / from_pretrained on it would "
            "replace the first one's adapter in the same layers. Add another adapter to the existing PeftModel "
            "with peft_model.add_adapter(name, config) (or load_adapter(folder, name)), call unload() / "
            "merge_and_unload() on it first, or wrap a separate copy (copy.deepcopy(base)).")


def _inputs_require_grad(model: nn.Module) -> None:
    """PEFT's `_prepare_model_for_gradient_checkpointing` (not for a quantised model)."""
    if any(getattr(model, k, False) for k in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif callable(getattr(model, "get_input_embeddings", None)) and model.get_input_embeddings() is not None:
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))


def _task_class(name: str, task: TaskType, params: str) -> type[PeftModel]:
    """PEFT's task class `name`: a PeftModel whose forward names PEFT's parameters `params` (transformers' Trainer
    reads `labels` / `start_positions` among them); the call is PeftModel's (None-valued ones are not passed on)."""
    names = params.split()
    signature = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names]
        + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])

    def forward(self, *args, **kwargs):
        if len(args) > len(names):
            raise TypeError(f"{name}.forward takes {len(names)} positional arguments, got {len(args)}.")
        named = dict(zip(names, args))
        both = sorted(set(named) & set(kwargs))
        if both:
            raise TypeError(f"Got {both} both by position and by name; pass each once.")
        named.update(kwargs)
        named.pop("task_ids", None)  # PEFT's multitask prompt tuning only
        return _peft_forward(self, **{k: v for k, v in named.items() if v is not None or k not in names})

    forward.__signature__ = signature
    doc = f"PEFT's `{name}`: a PeftModel for task_type {task.value} (get_peft_model returns it for that task)."
    return type(name, (PeftModel,), {"forward": _BaseSignatureForward(forward), "__doc__": doc,
                                     "__module__": __name__})


_COMMON = "input_ids attention_mask inputs_embeds"
_OUTPUTS = "output_attentions output_hidden_states return_dict task_ids"
PeftModelForCausalLM = _task_class("PeftModelForCausalLM", TaskType.CAUSAL_LM, f"{_COMMON} labels {_OUTPUTS}")
PeftModelForSequenceClassification = _task_class("PeftModelForSequenceClassification", TaskType.SEQ_CLS,
                                                 f"{_COMMON} labels {_OUTPUTS}")
PeftModelForSeq2SeqLM = _task_class("PeftModelForSeq2SeqLM", TaskType.SEQ_2_SEQ_LM, f"{_COMMON} decoder_input_ids "
                                    f"decoder_attention_mask decoder_inputs_embeds labels {_OUTPUTS}")
PeftModelForTokenClassification = _task_class("PeftModelForTokenClassification", TaskType.TOKEN_CLS,
                                              f"{_COMMON} labels {_OUTPUTS}")
PeftModelForQuestionAnswering = _task_class(
    "PeftModelForQuestionAnswering", TaskType.QUESTION_ANS,
    f"input_ids attention_mask token_type_ids position_ids inputs_embeds start_positions end_positions {_OUTPUTS}")
PeftModelForFeatureExtraction = _task_class("PeftModelForFeatureExtraction", TaskType.FEATURE_EXTRACTION,
                                            f"{_COMMON} {_OUTPUTS}")
TASK_CLASSES: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM, TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM, TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering, TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (any registered method's config); as in PEFT, the
    result is the task class of its task_type (PeftModelForCausalLM, ...) when it has one."""
    if isinstance(model, PeftModel):
        raise TypeError("This model is already a PeftModel; use model.add_adapter(name, config) to add another adapter.")
    check_adapter_name(adapter_name)
    return PeftModel._class_for_task(peft_config.task_type)(model, peft_config, adapter_name)
