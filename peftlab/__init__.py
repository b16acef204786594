"""peftlab: parameter-efficient fine-tuning of pretrained transformers.

The API keeps HF PEFT's names: `LoraConfig`, `get_peft_model`, `PeftModel.from_pretrained`,
`print_trainable_parameters`, `save_pretrained`, `add_adapter`, `set_adapter`, `merge_and_unload`, and PEFT's other
top-level names (task model classes, AutoPeftModel*, the state-dict helpers, ...). transformers' Trainer:
`peftlab.integrations.Trainer` (README, "Porting from PEFT").
"""


from .core.method import add_method_loader as _add_method_loader  # torch-free, as everything it imports


def _load_builtin_methods() -> None:
    from . import methods

    methods.load_builtin_methods()


# core's registry sits below the methods and never imports them: it calls this on its first lookup, which imports
# every built-in method folder (each registers itself). Every `import peftlab.<anything>` runs this file first.
_add_method_loader(_load_builtin_methods)

# Imported on first use (PEP 562): `import peftlab` and the `peftlab` command stay free of torch and transformers
# (about 5 CPU-seconds) until something needs them, so `peftlab --help` and config errors answer at once.
_EXPORTS = {
    "AdapterConfig": ".core.config",
    "ConfigError": ".core.config",
    "TaskType": ".core.config",
    "Method": ".core.method",
    "get_method": ".core.method",
    "register": ".core.method",
    "registered_methods": ".core.method",
    "PeftModel": ".core.model",
    "get_peft_model": ".core.model",
    "AdapterFileError": ".io.adapter_files",
    "AdaLoraConfig": ".methods.adalora.config",
    "BitFitConfig": ".methods.bitfit",
    "BottleneckConfig": ".methods.bottleneck.config",
    "DeltaLoraConfig": ".methods.delta_lora.config",
    "DoraConfig": ".methods.dora.config",
    "FeaturesConfig": ".methods.features.config",
    "FullConfig": ".methods.full",
    "HeadOnlyConfig": ".methods.head_only",
    "IclConfig": ".methods.icl.config",
    "LastLayersConfig": ".methods.last_layers",
    "IA3Config": ".methods.ia3.config",
    "LoraConfig": ".methods.lora",
    "LoraDropConfig": ".methods.lora_drop.config",
    "LoraFaConfig": ".methods.lora_fa.config",
    "LoraPlusConfig": ".methods.lora_plus.config",
    "PromptEncoderConfig": ".methods.p_tuning.config",
    "PrefixTuningConfig": ".methods.prefix_tuning.config",
    "PromptTuningConfig": ".methods.prompt_tuning.config",
    "QLoraConfig": ".methods.qlora.config",
    "VeraConfig": ".methods.vera.config",
    "LoHaConfig": ".methods.loha.config",
    "LoKrConfig": ".methods.lokr.config",
    "OFTConfig": ".methods.oft.config",
    "LNTuningConfig": ".methods.ln_tuning.config",
    "AdaptionPromptConfig": ".methods.adaption_prompt.config",
    "SelectiveConfig": ".methods.selective.config",
    "LoftQConfig": ".methods.lora.config",
    # the rest of PEFT's top-level names
    "PeftType": ".core.config",
    "PromptTuningInit": ".core.config",
    "PromptLearningConfig": ".methods.prompt_tuning.prompt_learning",
    **{n: ".core.model" for n in ("PeftModelForCausalLM", "PeftModelForFeatureExtraction",
                                  "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
                                  "PeftModelForSequenceClassification", "PeftModelForTokenClassification")},
    **{n: ".core.save_load" for n in ("config_from_dict", "get_peft_model_state_dict", "set_peft_model_state_dict",
                                      "load_peft_weights")},
    **{n: ".integrations" for n in ("AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
                                    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM",
                                    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
                                    "inject_adapter_in_model", "prepare_model_for_kbit_training",
                                    "get_layer_status", "get_model_status")},
}
_ALIASES = {"PeftConfig": "AdapterConfig",  # PEFT's name for the base config
            "get_peft_config": "config_from_dict"}


def __getattr__(name: str):
    import importlib

    target = _ALIASES.get(name, name)
    if target not in _EXPORTS:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[target], __name__), target)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_ALIASES))


__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "AdapterConfig", "AdapterFileError", "ConfigError", "DeltaLoraConfig", "DoraConfig",
    "LoraConfig", "LoraDropConfig", "LoraFaConfig", "LoraPlusConfig", "Method", "PeftConfig", "PeftModel",
    "QLoraConfig", "VeraConfig", "TaskType", "get_method", "get_peft_model", "register", "registered_methods",
    "BottleneckConfig", "IA3Config",
    "FeaturesConfig", "IclConfig",
    "PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig",
    "FullConfig", "LastLayersConfig", "HeadOnlyConfig", "BitFitConfig",
    "LoHaConfig", "LoKrConfig", "OFTConfig", "LNTuningConfig", "AdaptionPromptConfig", "SelectiveConfig", "LoftQConfig",
    # the rest of PEFT's top-level names
    "PeftType", "PromptTuningInit", "PromptLearningConfig", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "AutoPeftModel", "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction", "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification", "get_peft_config",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "load_peft_weights", "inject_adapter_in_model",
    "prepare_model_for_kbit_training", "get_layer_status", "get_model_status",
]
