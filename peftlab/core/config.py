"""The base adapter config: a dataclass that writes and reads `adapter_config.json`.

Every method's config subclasses `AdapterConfig`. Each field is documented once, by a string literal
directly under it; `field_docs(cls)` reads those strings back (from the source, with `ast`), so `--help`,
docs and error messages all quote the same text.

File compatibility: the JSON we write uses HF PEFT's key names (`peft_type`, `task_type`,
`target_modules`, ...), so PEFT loads our files. PEFT writes many keys for features we do not have
(`megatron_config`, `eva_config`, ...). Reading such a file, a key we do not know is accepted only when
its value is "off" (None, False, empty, or PEFT's default); a key that switches on a feature we lack
raises, because ignoring it would load an adapter that computes something else.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import json
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..io import adapter_files
from ..io.adapter_files import CONFIG_NAME
from ..io.atomic import atomic_write_text
from ..io.errors import ConfigError


class TaskType(str, enum.Enum):
    """What the wrapped model is for; PEFT's names, written to the file as plain strings."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """The `peft_type` tags peftlab reads and writes: PEFT's for the methods both have, peftlab's own for the rest
    (PEFT does not read those files)."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    VERA = "VERA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    LN_TUNING = "LN_TUNING"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    BOTTLENECK = "BOTTLENECK"
    FULL = "FULL"
    LAST_LAYERS = "LAST_LAYERS"
    HEAD_ONLY = "HEAD_ONLY"
    BITFIT = "BITFIT"
    FEATURES = "FEATURES"
    ICL = "ICL"
    SELECTIVE = "SELECTIVE"


class PromptTuningInit(str, enum.Enum):
    """PromptTuningConfig.prompt_tuning_init's choices, PEFT's names (the config also takes the plain strings)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class AdapterConfig:
    """Fields every method shares: what to adapt and how the adapter is described in its file."""

    peft_type: ClassVar[str] = ""
    """The method's tag in `adapter_config.json` (PEFT's, e.g. "LORA"); set by each method's config."""

    # Keys PEFT writes that we accept when they hold these "off" values (see module docstring).
    peft_inert_keys: ClassVar[dict[str, Any]] = {}

    # Fields that only steer training (e.g. LoRA+'s learning-rate ratio) and change nothing the adapter computes:
    # left out of adapter_config.json, so a file tagged with another method's peft_type (LoRA+ writes "LORA") holds
    # only that method's keys and PEFT and vLLM read it as such. They stay in `to_dict` (run configs keep them).
    file_omits: ClassVar[tuple[str, ...]] = ()
    # What `model.dtype: auto` loads the base in for this method, where the method needs another answer than the
    # hardware's (None: bf16 where native, else fp32). Full fine-tuning says fp32 (methods/full/config.py says why).
    auto_base_dtype: ClassVar[str | None] = None

    task_type: TaskType | str | None = None
    """What the model is for (CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, QUESTION_ANS,
    FEATURE_EXTRACTION). SEQ_CLS/TOKEN_CLS/QUESTION_ANS keep the task head trainable and saved."""

    target_modules: list[str] | str | None = None
    """Modules to adapt. A list matches a module whose full name equals an entry or ends with "." + entry;
    a string is a regular expression matched against the full name; "all-linear" is every linear-like
    layer except the output head. None: the architecture's usual default."""

    exclude_modules: list[str] | str | None = None
    """Modules never to adapt, with the same matching rules as `target_modules`."""

    modules_to_save: list[str] | None = None
    """Modules (matched like `target_modules` lists) trained in full and saved with the adapter, e.g. a
    new classifier head."""

    layers_to_transform: list[int] | int | None = None
    """Only adapt modules inside these layer indices (the number after `layers_pattern` in the name)."""

    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the layers (e.g. "layers", "h"); used with `layers_to_transform`.
    None: the common names (layers, h, block, blocks, layer) are tried."""

    base_model_name_or_path: str | None = None
    """The base model this adapter was made for; filled in by `get_peft_model` when known."""

    revision: str | None = None
    """Revision of the base model on the hub, if any."""

    inference_mode: bool = False
    """True: adapter weights are frozen (set when loading without `is_trainable`)."""

    def __new__(cls, *args, **kwargs):
        # PEFT spells some methods as a flag on another's config: LoraConfig(use_dora=True) is DoRA. A direct
        # subclass whose `claims_file` claims such a file's keys claims the same keyword arguments, so the call
        # builds that subclass (its __init__ then runs; the flag stays a field of both).
        for sub in cls.__subclasses__():
            claims = sub.__dict__.get("claims_file")
            if claims is not None and claims.__get__(None, sub)(kwargs):
                return super().__new__(sub)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                choices = ", ".join(t.value for t in TaskType)
                raise ConfigError(
                    f"task_type={self.task_type!r} is not a known task type; use one of: {choices}."
                ) from None
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear" and (
                self.layers_to_transform is not None or self.layers_pattern is not None):
            # PEFT refuses this pair (its files could not be read there); a regex can name the layers itself.
            raise ConfigError(
                f"target_modules={self.target_modules!r} is a regular expression, which cannot be combined with "
                f"layers_to_transform/layers_pattern (HF PEFT refuses such a config). Put the layer indices into the "
                r"expression, e.g. r'.*\.layers\.(0|1)\.self_attn\.(q|v)_proj', or give target_modules as a list."
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} is set but layers_to_transform is not; "
                "layers_pattern only says where the layer index is. Set layers_to_transform=[0, 1, ...] too."
            )

    # ---- (de)serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        """The file's text. Raises (before anything is written) if a value cannot be stored as JSON."""
        try:
            data = {k: v for k, v in self.to_dict().items() if k not in self.file_omits}
            return json.dumps(data, indent=2, sort_keys=True) + "\n"
        except TypeError as err:
            bad = [k for k, v in self.to_dict().items() if not _json_ok(v)]
            raise ConfigError(
                f"{type(self).__name__} cannot be written to {CONFIG_NAME}: {', '.join(bad) or 'a field'} "
                f"holds a value JSON cannot store ({err}). Use plain str/int/float/bool/list/dict values."
            ) from err

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        text = self.to_json_string()
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, CONFIG_NAME), text)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the config") -> "AdapterConfig":
        """Build this config from a dict (ours or PEFT's); refuse keys that would change the math."""
        data = dict(data)
        data.pop("peft_type", None)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key, value in data.items():
            if key in names or key in _ALWAYS_IGNORED:
                continue
            if _is_off(value) or (key in cls.peft_inert_keys and value == cls.peft_inert_keys[key]):
                continue
            raise ConfigError(
                f"{source} sets {key}={value!r}, a feature peftlab's {cls.__name__} does not implement; "
                f"loading it anyway would compute something else than the adapter was trained for. "
                f"Remove the key (or set it to null) only if you know the adapter does not use it."
            )
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        revision: str | None = None, **kwargs) -> "AdapterConfig":
        """PEFT's `PeftConfig.from_pretrained` / `LoraConfig.from_pretrained`: the config in an adapter folder (or
        hub repo), of the class its peft_type names whichever class this is called on (as PEFT does); `kwargs` set
        fields."""
        from .method import method_for_peft_type

        folder = adapter_files.resolve_adapter_dir(pretrained_model_name_or_path, subfolder, revision)
        fields = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS}  # PEFT also takes download options here
        data = {**adapter_files.read_config_dict(folder), **fields}
        source = os.path.join(folder, CONFIG_NAME)
        if "peft_type" not in data:
            return cls.from_dict(data, source=source)
        return method_for_peft_type(data["peft_type"], data).config_cls.from_dict(data, source=source)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        return field_docs(cls)


# Download options PEFT's from_pretrained accepts beside config fields (not fields; the folder is local or fetched).
HUB_KWARGS = {"token", "use_auth_token", "cache_dir", "force_download", "local_files_only", "proxies",
              "resume_download", "repo_type", "subfolder", "revision"}

# Keys that describe the file, not the math.
_ALWAYS_IGNORED = {"auto_mapping", "peft_version", "megatron_core"}


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field to the string literal written directly under it (walking the MRO)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (e.g. frozen app): docs are a nicety, not a need
            continue
        body = tree.body[0].body  # the class statement's body
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def check_choice(config_name: str, field_name: str, value: Any, choices) -> None:
    """Raise a ConfigError unless `value` is one of `choices` (a list or a dict's keys)."""
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{config_name}.{field_name}={value!r} is not valid; use one of: {shown}.")


def check_number(config_name: str, field_name: str, value: Any, *, low=None, high=None,
                 integer=False, low_inclusive=True, high_inclusive=True) -> None:
    """Raise a ConfigError unless `value` is a number within the given bounds."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        lo = "" if low is None else (f">= {low}" if low_inclusive else f"> {low}")
        hi = "" if high is None else (f"<= {high}" if high_inclusive else f"< {high}")
        want = " and ".join(x for x in (lo, hi) if x)
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{config_name}.{field_name}={value!r} is not valid; it must be {what}"
                          f"{' ' + want if want else ''}.")


__all__ = ["AdapterConfig", "TaskType", "PeftType", "PromptTuningInit", "ConfigError", "CONFIG_NAME", "field_docs", "field", "check_choice",
           "check_number"]
