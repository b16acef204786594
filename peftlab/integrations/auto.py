"""PEFT's AutoPeftModel classes: load the base model an adapter folder names, then the adapter onto it.

`AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` reads `base_model_name_or_path` (and `revision`) from the
folder's adapter_config.json, builds the base with the matching transformers Auto class, grows its embeddings when
the folder carries a tokenizer with more tokens (as PEFT does), and returns `PeftModelForCausalLM.from_pretrained`'s
model (eval mode unless is_trainable=True).
"""

from __future__ import annotations

import importlib
import json
import os

import transformers

from ..core.config import AdapterConfig, ConfigError, TaskType
from ..core.model import TASK_CLASSES, PeftModel
from ..io import adapter_files

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
DEFAULT_IMPORT_ALLOWLIST = ("transformers",)


class _BaseAutoPeftModel:
    _target_class: type | None = None  # the transformers Auto class of the base model
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args, **kwargs):
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_dir).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter_name: str = "default", is_trainable: bool = False,
                        config: AdapterConfig | None = None, revision: str | None = None,
                        import_allowlist: list[str] | None = None, **kwargs) -> PeftModel:
        """PEFT's signature: `kwargs` go to the base model's `from_pretrained` (e.g. torch_dtype, device_map)."""
        peft_config = AdapterConfig.from_pretrained(pretrained_model_name_or_path, revision=revision)
        task_type = peft_config.task_type
        target_class = cls._target_class
        if target_class is None and task_type is not None:
            raise ValueError("Cannot use `AutoPeftModel` with a task type, please use a specific class for your task "
                             "type. (e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)")
        if task_type is not None:
            expected = TASK_CLASSES[TaskType(task_type)]
            if cls._target_peft_class is not expected:
                raise ValueError(f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                                 f"{cls._target_peft_class.__name__} make sure that you are loading the correct "
                                 "model for your task type.")
        elif target_class is None:
            target_class = _auto_mapping_class(pretrained_model_name_or_path, revision,
                                               import_allowlist or DEFAULT_IMPORT_ALLOWLIST)
        if not peft_config.base_model_name_or_path:
            raise ConfigError(f"{pretrained_model_name_or_path}: adapter_config.json names no base_model_name_or_path, "
                              "so the base model is unknown. Load the base yourself and use "
                              "PeftModel.from_pretrained(base, adapter_dir).")
        base = target_class.from_pretrained(peft_config.base_model_name_or_path, revision=peft_config.revision,
                                            **kwargs)
        folder = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(os.path.join(folder, TOKENIZER_CONFIG_NAME)) and hasattr(base, "get_input_embeddings"):
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, revision=revision)
            if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:  # only ever grown, as PEFT does
                base.resize_token_embeddings(len(tokenizer))
        return cls._target_peft_class.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                                      is_trainable=is_trainable, config=config, revision=revision)


def _auto_mapping_class(model_id, revision, allowlist) -> type:
    """AutoPeftModel without a task type: the base class PEFT recorded in the file's `auto_mapping`."""
    folder = adapter_files.resolve_adapter_dir(model_id, None, revision)
    with open(os.path.join(folder, adapter_files.CONFIG_NAME), encoding="utf-8") as fh:
        mapping = json.load(fh).get("auto_mapping") or {}
    library, name = mapping.get("parent_library"), mapping.get("base_model_class")
    if not library or not name:
        raise ValueError("Cannot infer the auto class from the config, please make sure that you are loading the "
                         "correct model for your task type.")
    if library.split(".")[0] not in allowlist:
        raise ValueError(f"The auto mapping wants to import '{library}' which is not in the import allowlist. If you "
                         f"are sure that importing this library is safe, specify `import_allowlist=['{library}']` in "
                         "`from_pretrained()`.")
    return getattr(importlib.import_module(library), name)


def _auto(name: str, auto_class: str | None, task: TaskType | None) -> type:
    target = getattr(transformers, auto_class) if auto_class else None
    peft_class = TASK_CLASSES[task] if task else PeftModel
    return type(name, (_BaseAutoPeftModel,), {"_target_class": target, "_target_peft_class": peft_class,
                                              "__module__": __name__,
                                              "__doc__": f"PEFT's {name}: see the module docstring."})


AutoPeftModel = _auto("AutoPeftModel", None, None)
AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", "AutoModelForCausalLM", TaskType.CAUSAL_LM)
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM", TaskType.SEQ_2_SEQ_LM)
AutoPeftModelForSequenceClassification = _auto("AutoPeftModelForSequenceClassification",
                                               "AutoModelForSequenceClassification", TaskType.SEQ_CLS)
AutoPeftModelForTokenClassification = _auto("AutoPeftModelForTokenClassification", "AutoModelForTokenClassification",
                                            TaskType.TOKEN_CLS)
AutoPeftModelForQuestionAnswering = _auto("AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering",
                                          TaskType.QUESTION_ANS)
AutoPeftModelForFeatureExtraction = _auto("AutoPeftModelForFeatureExtraction", "AutoModel",
                                          TaskType.FEATURE_EXTRACTION)
