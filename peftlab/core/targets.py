"""Which modules an adapter goes on: matching rules, architecture defaults, and the errors when none match.

Rules (HF PEFT's):
- a list matches a module whose full name equals an entry or ends with "." + entry;
- a string is a regular expression that must match the whole name;
- "all-linear" is every linear-like layer except the output head (`get_output_embeddings()`).
`layers_to_transform` keeps only modules whose layer index (the number after `layers_pattern`) is listed.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter

from torch import nn

from .config import AdapterConfig, ConfigError

try:  # GPT-2 style layers store the weight transposed (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep core importable alone
    class Conv1D(nn.Module):  # type: ignore[no-redef]
        pass

ALL_LINEAR = "all-linear"

# The usual LoRA targets (attention query and value) per `config.model_type`, as HF PEFT picks them.
ATTENTION_QV_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
         "gemma3_text", "opt", "bart", "mbart", "blenderbot", "marian", "pegasus", "m2m_100", "gptj",
         "gpt_neo", "stablelm", "starcoder2", "olmo", "olmo2", "granite", "cohere", "phi", "whisper",
         "idefics2", "smollm3"],
        ["q_proj", "v_proj"],
    ),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert", "layoutlm", "ernie", "megatron-bert",
                     "mobilebert", "xmod", "modernbert"], ["query", "value"]),
    **dict.fromkeys(["t5", "mt5", "umt5", "longt5", "switch_transformers"], ["q", "v"]),
    **dict.fromkeys(["gpt_neox", "bloom", "falcon", "persimmon"], ["query_key_value"]),
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "phi3": ["qkv_proj"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
    "chatglm": ["query_key_value"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
}

# Module lists that hold the transformer blocks, tried when `layers_pattern` is not given.
COMMON_LAYER_LISTS = ["layers", "h", "block", "blocks", "layer"]


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, or a module holding a linear layer's weight in another form that says so with
    a class attribute `linear_like = True` (QLoRA's NF4Linear, built at load time: "all-linear" must still find it)."""
    return isinstance(module, (nn.Linear, Conv1D)) or getattr(type(module), "linear_like", False)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (lm_head and the like), excluded from "all-linear"."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    return {name for name, mod in model.named_modules() if mod is head}


def block_lists(model: nn.Module, layers_pattern: list[str] | str | None = None) -> list[tuple[str, nn.ModuleList]]:
    """(name, ModuleList) of the lists holding the transformer blocks: those whose last name part is one of
    `layers_pattern` (default COMMON_LAYER_LISTS), outermost first. An encoder-decoder has two (T5: encoder.block,
    decoder.block); lists nested inside a block (none in common models) are skipped."""
    patterns = COMMON_LAYER_LISTS if layers_pattern is None else (
        [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern))
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in patterns
                and not any(name.startswith(f"{outer}.") for outer, _ in found)):
            found.append((name, module))
    return found


def matches(name: str, spec: list[str] | str | None) -> bool:
    """Does full module name `name` match a target/exclude spec (list of suffixes or full regex)?"""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def pattern_value(name: str, patterns: dict[str, object], default):
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: a key (may be a regex) matching the end of the name."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    patterns = COMMON_LAYER_LISTS if layers_pattern is None else (
        [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern))
    for pat in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pat)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


MAX_PATTERN_CHARS = 4096  # a target regex is tens of characters; 10 MB took minutes and GBs to fail


def check_pattern_size(spec, field: str) -> None:
    """Refuse a regex too long to be meant: compiling and matching a 10 MB one takes minutes. Only a string is a
    regex; a list holds module names matched by suffix in linear time, and a saved all-linear adapter of a large model
    lists every adapted module's full path (Llama-70B: 560 paths, ~25,000 characters), so lists are not bounded."""
    size = len(spec) if isinstance(spec, str) else 0
    if size > MAX_PATTERN_CHARS:
        raise ConfigError(f"{field} has {size:,} characters (at most {MAX_PATTERN_CHARS:,}): it starts "
                          f"{str(spec)[:60]!r}. Give module names (e.g. ['q_proj', 'v_proj']) or a short regex.")


def resolve_target_spec(config: AdapterConfig, model: nn.Module, defaults: dict[str, list[str]],
                        method_name: str) -> list[str] | str:
    """The config's target_modules, or the architecture default for this method."""
    for field in ("target_modules", "exclude_modules"):
        check_pattern_size(getattr(config, field, None), field)
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in defaults:
        return list(defaults[model_type])
    names = candidate_names(model)
    raise ConfigError(
        f"target_modules is not set and {method_name} has no default targets for "
        f"model_type={model_type!r}. Linear-like modules present: {_summarise(names)}. "
        f"Set them explicitly, e.g. target_modules={_example(names)}, or target_modules='all-linear'."
    )


def candidate_names(model: nn.Module, skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Full names of linear-like modules (the usual targets), in model order."""
    return [n for n, m in model.named_modules() if is_linear_like(m) and not n.startswith(skip_prefixes)]


def select_targets(model: nn.Module, config: AdapterConfig, spec: list[str] | str,
                   skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Names of the modules to wrap, applying target spec, exclusions and layers_to_transform."""
    heads = output_head_names(model)
    protected = set(config.modules_to_save or [])
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or name.startswith(skip_prefixes):
            continue
        if spec == ALL_LINEAR:
            hit = is_linear_like(module) and name not in heads and not matches(name, list(protected))
        else:
            hit = matches(name, spec)
        if not hit or matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            idx = layer_index(name, config.layers_pattern)
            if idx is None or idx not in config.layers_to_transform:
                continue
        chosen.append(name)
    if not chosen:
        raise ConfigError(_no_match_message(model, config, spec, skip_prefixes))
    return chosen


def _no_match_message(model: nn.Module, config: AdapterConfig, spec, skip_prefixes) -> str:
    names = candidate_names(model, skip_prefixes)
    leafs = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [spec] if isinstance(spec, str) else list(spec)
    near: list[str] = []
    for w in wanted:
        near += difflib.get_close_matches(w.rsplit(".", 1)[-1], leafs, n=3, cutoff=0.3)
    near = list(dict.fromkeys(near))
    extra = ""
    if config.layers_to_transform is not None:
        extra = (f" (layers_to_transform={config.layers_to_transform}, layers_pattern="
                 f"{config.layers_pattern!r} also filter)")
    if config.exclude_modules:
        extra += f" (exclude_modules={config.exclude_modules!r} also filters)"
    nearest = f" Nearest module names present: {', '.join(near)}." if near else ""
    return (
        f"target_modules={spec!r} matched no module of {type(model).__name__}{extra}.{nearest} "
        f"Linear-like modules present: {_summarise(names)}. Example: target_modules={_example(names)}."
    )


def _summarise(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    counts = Counter(n.rsplit(".", 1)[-1] for n in names)
    parts = [f"{leaf} (x{c})" if c > 1 else leaf for leaf, c in counts.most_common()]
    more = f", ... {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _example(names: list[str]) -> list[str]:
    counts = Counter(n.rsplit(".", 1)[-1] for n in names)
    return [leaf for leaf, _ in counts.most_common(2)] or ["q_proj", "v_proj"]


def group_by_pattern(names: list[str]) -> dict[str, list[str]]:
    """Group module names by their shape with layer numbers replaced by '*' (for `peftlab inspect`)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", n), []).append(n)
    return groups
