"""(IA)³: learned vectors that rescale keys, values and the feedforward input (see layer.py for the math)."""

from __future__ import annotations

import dataclasses

from torch import nn

from ...core.config import ConfigError
from ...core.method import Method, register
from ...core.targets import ALL_LINEAR, Conv1D, matches
from .config import IA3Config, suffix_regex
from .layer import IA3Linear, is_feedforward

# HF PEFT's defaults per `config.model_type` (peft.utils.constants TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
# and ..._FEEDFORWARD_MODULES_MAPPING, PEFT 0.21.2); tests/test_method_ia3.py checks both tables equal PEFT's.
IA3_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


def complete_ia3_config(model: nn.Module, config: IA3Config) -> IA3Config:
    """`Method.complete_config`: resolve feedforward_modules before injection, so every layer knows which side it
    scales, and keep the file readable by HF PEFT (which requires a list feedforward_modules to be a subset of a list
    target_modules, also when it re-reads its own files).

    - None: the model type's default (PEFT's rule), left as is when target_modules is None (the defaults of one
      architecture fit each other); with a list target_modules, only its entries that are in that list are kept, and
      an entry that would make a targeted module feedforward without being in the list is an error (PEFT would use
      it, then refuse the file it wrote).
    - target_modules="all-linear": core records the chosen full module names, which a suffix list such as
      ["down_proj"] is not a subset of; the list becomes the equivalent regular expression (PEFT's suffix rule:
      name ends with an entry <=> the name fully matches `.*(?:entry|...)`).
    """
    ff, targets = config.feedforward_modules, config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if ff is None:
        if model_type not in IA3_FEEDFORWARD:
            raise ConfigError(
                f"IA3Config.feedforward_modules is not set and ia3 has no default for model_type={model_type!r} "
                f"(defaults exist for: {', '.join(sorted(IA3_FEEDFORWARD))}). Set feedforward_modules to the targets "
                "whose input is scaled (the MLP's second projection, e.g. ['down_proj']; [] for none), as a subset of "
                "target_modules.")
        ff = list(IA3_FEEDFORWARD[model_type])
        if isinstance(targets, list):
            ff = _fit_default_to_targets(model, model_type, targets, ff)
    elif targets is None and isinstance(ff, list) and model_type in IA3_TARGETS:
        default = IA3_TARGETS[model_type]
        if not set(ff) <= set(default):
            raise ConfigError(
                f"IA3Config.feedforward_modules={ff!r} is not a subset of the default target_modules={default!r} for "
                f"model_type={model_type!r} (missing: {sorted(set(ff) - set(default))}). Set target_modules too, "
                "including every feedforward module.")
    if targets == ALL_LINEAR and isinstance(ff, list) and ff:
        ff = suffix_regex(ff)
    return dataclasses.replace(config, feedforward_modules=ff)


def _fit_default_to_targets(model: nn.Module, model_type: str, targets: list[str], ff: list[str]) -> list[str]:
    targeted = [n for n, _ in model.named_modules() if n and matches(n, targets)]
    outside = [entry for entry in ff if entry not in targets]
    for entry in outside:
        hit = next((n for n in targeted if is_feedforward(n, [entry])), None)
        if hit is not None:
            raise ConfigError(
                f"IA3Config.feedforward_modules is not set, so ia3 takes model_type={model_type!r}'s default "
                f"{IA3_FEEDFORWARD[model_type]!r}; its entry {entry!r} would make the targeted module {hit!r} "
                f"feedforward, but it is not in target_modules={targets!r}, and feedforward_modules must be a subset "
                f"of target_modules (HF PEFT cannot read the file otherwise). Set feedforward_modules explicitly: the "
                f"entries of target_modules whose input is scaled, or [] to scale every target's output.")
    return [entry for entry in ff if entry in targets]


def no_decay_groups(model, adapter_name: str, params, lr: float) -> list[dict]:
    """One group with weight_decay 0: the vectors are stored (1, d) / (d, 1) as PEFT's files have them, so the loop's
    "no decay on 1-D tensors" rule would miss them, and decay would pull the scales towards 0 instead of 1."""
    return [{"params": [p for _, p in params], "lr": lr, "weight_decay": 0.0}]


METHOD = register(Method(
    name="ia3",
    config_cls=IA3Config,
    layers=((nn.Linear, IA3Linear), (Conv1D, IA3Linear)),
    summary="(IA)³: learned vectors scaling keys/values (output) and the feedforward input (start at 1)",
    default_targets=IA3_TARGETS,
    complete_config=complete_ia3_config,
    param_groups=no_decay_groups,
))

__all__ = ["IA3Config", "IA3Linear", "IA3_TARGETS", "IA3_FEEDFORWARD", "METHOD"]
