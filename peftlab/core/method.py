"""The method half of the contract, and the registry of methods.

A method is a folder under `peftlab/methods/` whose `__init__.py` calls `register(Method(...))` once.
Core code (injection, the wrapped model, files, the training loop) only ever talks to `Method` objects
looked up here; it never names a specific method.

A `Method` says:
- `name`: what users type (`method: lora` in a config, `peftlab methods` lists it);
- `config_cls`: its config dataclass (whose `peft_type` is the tag written to `adapter_config.json`);
- `layers`: which base module types it wraps, and with which `AdapterLayer` subclass;
- `default_targets`: model_type -> target_modules used when the config names none;
- training-time hooks, all optional, which the wrapped model exposes and the training loop calls:
  `param_groups` (e.g. LoRA+'s separate learning rate for B), `on_step` (e.g. AdaLoRA's rank budget,
  Delta-LoRA's base update), `extra_loss` (e.g. AdaLoRA's orthogonality regulariser);
- `combine` (optional): build a new adapter from weighted existing ones (`add_weighted_adapter`).
- `tuner_calls` (optional): PEFT's method-specific calls on `model.base_model` (AdaLoRA's `update_and_allocate`).
- `shared_tensors` / `saves_shared` (optional): model-level tensors one adapter owns once for all its layers
  (VeRA's shared random projections), kept and saved by core.
- `to_file` / `load_targets` / `after_load` (optional): what a method's files hold beyond `adapter_tensors`
  (AdaLoRA's pruned triplets, Delta-LoRA's updated base weights) and what loading does after the copy.
- `prepare` (optional): a phase the training loop runs before the main training (LoRA-drop's layer selection).
- `merges` / `complete_config` / `base_tensors` (optional): whether the adapter can be merged into the weights; a
  config filled in from the model (head_only's head, last_layers' blocks); base-model parameters the adapter trains
  in place (full fine-tuning, BitFit). A method with no `layers` wraps no module.
- `run` (optional): a method that is not trained by gradient steps (features + logistic regression, in-context
  learning) takes over the whole `peftlab train` run instead of the training loop.
- `model_modules` / `forward` / `generate` / `from_file` (optional): input-side methods (prompt tuning, prefix
  tuning, P-tuning): a trainable module per adapter held on the wrapped model (PEFT's `prompt_encoder.<adapter>`),
  hooks that run the base model with the inputs rewritten, and the file layout read back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import AdapterConfig, ConfigError

if TYPE_CHECKING:  # torch stays out of this module: config validation looks methods up before torch is imported
    from torch import nn

    from .layer import AdapterLayer
    from .model import PeftModel


def _no_groups(model: "PeftModel", adapter_name: str, params: list[tuple[str, nn.Parameter]], lr: float):
    return None


def _no_step(model: "PeftModel", adapter_name: str, step: int) -> None:
    return None


def _no_loss(model: "PeftModel", adapter_name: str):
    return None


def _always(config: AdapterConfig) -> bool:
    return True


def _same_tensors(model: "PeftModel", adapter_name: str, tensors: dict[str, Any]) -> dict[str, Any]:
    return tensors


def _no_load_targets(model: "PeftModel", adapter_name: str, found: dict[str, Any]) -> None:
    return None


def _no_after_load(model: "PeftModel", adapter_name: str) -> None:
    return None


def _no_prepare(model: "PeftModel", adapter_name: str, run: Any) -> None:
    return None


def _config_as_given(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    return config


@dataclass(frozen=True)
class Method:
    name: str
    """What users type to pick the method (`method: lora`)."""

    config_cls: type[AdapterConfig]
    """The config dataclass; its `peft_type` tags the method in adapter files."""

    layers: tuple[tuple[type | Callable[[nn.Module], bool], type["AdapterLayer"]], ...]
    """(base module type or predicate, wrapper class) pairs, tried in order."""

    summary: str = ""
    """One line for `peftlab methods`."""

    default_targets: dict[str, list[str]] = field(default_factory=dict)
    """model_type -> target_modules when the config gives none."""

    param_groups: Callable[..., list[dict[str, Any]] | None] = _no_groups
    """(model, adapter_name, [(name, param)], lr) -> optimizer param groups for this adapter's trainable
    parameters, or None for one plain group."""

    on_step: Callable[..., None] = _no_step
    """(model, adapter_name, step) -> None, called by the loop after every optimizer step, before the gradients
    are cleared (so a hook can read them); `step` counts completed optimizer steps from 1."""

    extra_loss: Callable[..., Any] = _no_loss
    """(model, adapter_name) -> a scalar tensor added to the training loss, or None."""

    tuner_calls: dict[str, Callable[..., Any]] = field(default_factory=dict)
    """{name: (model, adapter_name, *args, **kwargs) -> None}: calls PEFT offers for this method on
    `model.base_model` (its tuner model) beyond the common ones, e.g. AdaLoRA's `update_and_allocate(global_step)`.
    `peft_model.base_model.<name>(...)` runs it for each active adapter of this method; with no such adapter active
    it raises AttributeError naming the methods that have it."""

    combine: Callable[..., None] | None = None
    """(model, adapters, weights, adapter_name, combination_type, **options) -> None: add a new adapter that
    combines existing ones. None: `add_weighted_adapter` is not available for this method."""

    shared_tensors: Callable[..., dict[str, Any]] | None = None
    """(model, adapter_name, config, layers) -> {name: tensor}: model-level tensors that one adapter owns once
    for all of its layers, e.g. VeRA's frozen random projections A (r, in_max) and B (out_max, r) that every
    adapted layer slices. Called once per adapter, after its layers are injected; `layers` is [(module path,
    layer)] of that adapter, so the hook can size the tensors to the largest layer. Core keeps each tensor as a
    frozen buffer at `base_model.<name>.<adapter_name>` (PEFT's place, e.g. `base_model.vera_A.default`), moves it
    with the model, drops it with the adapter, hands every layer of the adapter a reference (a layer reads it with
    `self.shared_tensor(name, adapter_name)`), and lists it in `PeftModel.adapter_tensors` under the file key
    `base_model.<name>` (its state-dict name without the adapter name, PEFT's rule) when `saves_shared(config)`.
    None: the method has no model-level tensors."""

    saves_shared: Callable[[AdapterConfig], bool] = _always
    """(config) -> whether the `shared_tensors` are written to (and read from) the adapter file. False: they are
    left out, and loading rebuilds them by calling `shared_tensors` again (VeRA's save_projection=False
    regenerates its projections from projection_prng_key)."""

    to_file: Callable[..., dict[str, Any]] = _same_tensors
    """(model, adapter_name, tensors) -> tensors: the {file key: tensor} dict `save_pretrained` (and so every
    checkpoint) is about to write for this adapter (`adapter_tensors` plus any saved embedding layers); return
    the dict to write. Default: unchanged. AdaLoRA keeps only the triplets its `rank_pattern` keeps (PEFT's
    resize on save); Delta-LoRA adds the base weights it has changed in place."""

    load_targets: Callable[..., dict[str, Any] | None] = _no_load_targets
    """(model, adapter_name, found) -> {file key: tensor of the model} or None: tensors beyond `adapter_tensors`
    that this method's files carry (`found` is the file's {key: tensor}), into which loading copies them, e.g.
    Delta-LoRA's updated base weights. Called when a file is loaded into the adapter (from_pretrained,
    load_adapter, checkpoint resume), after injection and before anything is copied; they are checked together
    with the adapter's own tensors, so a file that does not fit changes nothing. The hook may also raise a
    clearer error than the generic shape check for a file it knows it cannot read."""

    after_load: Callable[..., None] = _no_after_load
    """(model, adapter_name) -> None, called once a file's tensors are copied into the adapter: e.g. Delta-LoRA
    takes the loaded A and B as the previous step's, so that training on continues its base update exactly."""

    prepare: Callable[..., str | None] = _no_prepare
    """(model, adapter_name, run) -> Markdown text or None: a phase before the main training, e.g. LoRA-drop's short
    LoRA run on a sample of the rows that decides which layers keep their own adapter. The training loop calls it
    once per active adapter, after injection and before it builds the optimizer, so the hook may change which
    tensors train (tie layers to one shared pair, freeze some) and the main optimizer sees the result. `run`
    (peftlab.train.prepare.PrepareRun) gives the hook the run's rows and recipe: `sample_rows(n)` (indices of n
    training rows, stratified by label for classification), `train(steps, rows)` (optimizer steps taken as the main
    loop takes them, with the run's lr, schedule, clipping, precision and processes, on those rows; its optimizer is
    thrown away afterwards), `batches(rows)` (collated batches on the device, e.g. for scoring), `log(text)`,
    `write_json(name, data)` (into the run's output_dir, main process only), and `train_rows`, `global_batch`,
    `seed`, `output_dir`. The returned text goes into the final adapter's model card (README.md). `--resume` calls
    the hook again before the checkpoint is loaded, so it must rebuild the same structure for the same seed (the
    loop seeds everything before it). Code that trains without `peftlab train` calls the method's own Python API
    instead (e.g. peftlab.methods.lora_drop.select_layers / share_layers)."""

    merges: bool = True
    """Whether the adapter's effect can be folded into the base weights (`merge_adapter`, `merge_and_unload`). False
    for methods whose effect is not a weight update (bottleneck adapters' non-linearity, prompt tuning's extra
    tokens): merging then raises before anything changes."""

    complete_config: Callable[..., AdapterConfig] = _config_as_given
    """(model, config) -> config: fill in what depends on the model before injection, e.g. head_only puts the
    model's output layer into modules_to_save. `model` is the user's model (no wrappers of this adapter yet)."""

    base_tensors: Callable[..., dict[str, nn.Parameter]] | None = None
    """(model, config) -> {parameter path in the user's model: parameter}: base-model parameters this adapter trains
    in place (full fine-tuning: all of them; BitFit: the biases). Core makes them trainable while the adapter is
    active, counts and saves them with it (file key `base_model.model.<path>`), and loads files into them. Training
    changes the base itself: `disable_adapter()` and `unload()` warn that they cannot give the original weights back,
    and only one adapter with base tensors may live on a model. Parameters inside modules_to_save wrappers are left
    out (their copies train). None: the method trains no base parameter."""

    updates_base: bool = False
    """True when training changes the base weights the adapter sits on (Delta-LoRA adds its update to W after each
    step). Like `base_tensors`, this makes `disable_adapter()` / `unload()` warn, and tasks whose reference model is
    "the base with adapters disabled" (dpo) refuse the method, since their reference would move."""

    run: Callable[..., dict[str, Any]] | None = None
    """(run) -> result: a method that is not trained by the gradient loop (frozen features + logistic regression,
    in-context learning) does the whole `peftlab train` run itself. `run` (peftlab.train.method_run.MethodRun) is what
    the training layer hands down: the run config (`run.run`), `log`, the checked rows (`classify_splits(name)`), the
    base and autocast dtypes, and `write_outputs(...)`, which writes the run folder (`adapter/` with the method's
    files and the model card, `metrics.jsonl`, `run_config.yaml`). The hook returns the dict the training loop
    returns (`before`, `after`, `steps`, `train_seconds`, `tokens_per_s`, `adapter_dir`, `data`, `method_notes`,
    `trainable_params`, `all_params`). None: the method trains through the loop."""

    # ---- input-side methods (prompt tuning, prefix tuning, P-tuning): a model-level module and a forward hook ----

    model_modules: Callable[..., dict[str, nn.Module]] | None = None
    """(model, adapter_name, config) -> {store name: module}: trainable modules one adapter owns at the level of the
    whole model rather than inside a base layer, e.g. prompt tuning's virtual-token table or P-tuning's prompt encoder
    (an MLP/LSTM). Called once per adapter, after its layers (if any) are injected; `config` is the completed config.
    Core keeps each module at `PeftModel.<store name>[adapter_name]` (an nn.ModuleDict; PEFT's place, e.g.
    `prompt_encoder.default`), so it moves with the model, counts in `get_nb_trainable_parameters`, and goes with
    `delete_adapter`. Its state-dict entries are part of `adapter_tensors` under `<store name>.<entry>` (the adapter
    name dropped, PEFT's rule), so core freezes, unfreezes, counts, saves and loads them like layer tensors; `to_file`
    / `from_file` may give them another layout in files. The module is used only by the method's own `forward` /
    `generate` hooks, so it acts only while its adapter is active and adapters are not disabled. None: no such
    module."""

    forward: Callable[..., Any] | None = None
    """(model, adapter_name, kwargs) -> output: run the base model for this adapter, for methods that act on the
    inputs rather than on base layers (prepend virtual tokens to inputs_embeds, extend attention_mask, pad token
    labels with -100, pass key/value prefixes as past_key_values, ...). `PeftModel.forward` calls it instead of the
    base model's forward when an active adapter's method has one and adapters are not disabled (`disable_adapter()`
    skips it); positional arguments arrive bound to their names in `kwargs`. The hook calls the base model itself
    (`model.get_base_model()`), through any injected layers of other active adapters. At most one active adapter may
    have a `forward` hook. None: the base model's own forward runs."""

    generate: Callable[..., Any] | None = None
    """(model, adapter_name, kwargs) -> output: `PeftModel.generate` for the same adapters as `forward` (HF generate
    calls the base model's forward directly, so a method that rewrites the inputs needs its own path, e.g. changing
    the first step's inputs through `prepare_inputs_for_generation`). Required when `forward` is given."""

    from_file: Callable[..., dict[str, Any]] = _same_tensors
    """(model, adapter_name, found) -> found: the inverse of `to_file`: a file's {key: tensor} (ours or PEFT's) as
    `adapter_tensors` keys them, before loading checks and copies them (from_pretrained, load_adapter, checkpoint
    resume). E.g. prompt tuning's file holds one tensor `prompt_embeddings` (PEFT's layout) that loads into
    `prompt_encoder.embedding.weight`. May raise a clear error for a file it cannot read into this adapter. Default:
    unchanged."""

    quantize_at_load: Callable[..., Any] | None = None
    """(config) -> the `quantize` argument of peftlab.models.load_model: loaders that know the method before the
    weights are read (`peftlab train`, `peftlab.train.model_loading`) hand it over, and the modules the method would
    hold in low precision are built as their weights are read, never in full precision (QLoRA's NF4 bases). None:
    the base loads in its dtype and the method wraps it as usual."""

    def wrapper_for(self, module: nn.Module) -> type["AdapterLayer"] | None:
        for match, wrapper in self.layers:
            if (isinstance(match, type) and isinstance(module, match)) or (
                not isinstance(match, type) and match(module)
            ):
                return wrapper
        return None

    def supported_types(self) -> str:
        return ", ".join(getattr(m, "__name__", repr(m)) for m, _ in self.layers)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"A method named {method.name!r} is already registered; pick another name.")
    _REGISTRY[method.name] = method
    return method


# Callables that register methods when the registry is first read. core never imports the methods package (it sits
# above core); peftlab/__init__.py, which every `import peftlab...` runs first, adds the one that loads the built-in
# methods (peftlab.methods.load_builtin_methods).
_LOADERS: list[Callable[[], None]] = []


def add_method_loader(loader: Callable[[], None]) -> None:
    """Have `loader()` called (once) before the registry is next read, e.g. to import a package of methods."""
    if loader not in _LOADERS:
        _LOADERS.append(loader)


def _run_method_loaders() -> None:
    while _LOADERS:
        loader = _LOADERS.pop(0)  # taken off first: a method that reads the registry while it loads must not recurse
        try:
            loader()
        except BaseException:
            _LOADERS.insert(0, loader)  # the next lookup tries again (and shows the same error)
            raise


def registered_methods() -> list[Method]:
    _run_method_loaders()
    return list(_REGISTRY.values())


def registered_names(load: bool = True) -> list[str]:
    """The names of the registered methods; `load=False`: those registered so far, without loading the built-in
    methods (nor torch)."""
    if load:
        _run_method_loaders()
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    _run_method_loaders()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise KeyError(no_method_message(name, list(_REGISTRY)))


def no_method_message(name: str, known: list[str]) -> str:
    """The error for a method name that is not one of `known`, with the nearest names."""
    import difflib

    near = difflib.get_close_matches(str(name), known, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return f"No method named {name!r}.{hint} Registered: {', '.join(sorted(known))}."


def method_for_config(config: AdapterConfig) -> Method:
    """The method a config instance belongs to (exact class match, then subclass)."""
    methods = registered_methods()
    for m in methods:
        if type(config) is m.config_cls:
            return m
    for m in methods:
        if isinstance(config, m.config_cls):
            return m
    raise TypeError(f"{type(config).__name__} belongs to no registered method; register one with "
                    "peftlab.core.method.register(Method(...)).")


def method_for_peft_type(peft_type: str, config_dict: dict[str, Any] | None = None) -> Method:
    """The method whose config writes `peft_type`. Several methods may share one tag (PEFT writes DoRA as
    LORA with use_dora=true); a config class may then claim a file with `claims_file(config_dict)`. A file no
    config claims goes to the most general candidate, the one whose config class every other candidate's
    subclasses (LoraConfig for "LORA": LoRA-FA and LoRA+ files are plain LoRA files), whatever the import order."""
    candidates = [m for m in registered_methods() if m.config_cls.peft_type == peft_type]
    if not candidates:
        known = sorted({m.config_cls.peft_type for m in registered_methods()})
        raise ConfigError(
            f"The adapter file says peft_type={peft_type!r}, which no peftlab method reads. "
            f"Known types: {', '.join(known)}."
        )
    for m in candidates:
        claims = getattr(m.config_cls, "claims_file", None)
        if claims is not None and config_dict is not None and claims(config_dict):
            return m
    general = [m for m in candidates if all(issubclass(o.config_cls, m.config_cls) for o in candidates)]
    return (general or candidates)[0]

