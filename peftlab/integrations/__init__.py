"""peftlab with the tools PEFT users come from: transformers' Trainer, AutoPeftModel, k-bit preparation, adapters on a
plain model, layer/model status. `Trainer` is imported on first use (transformers.trainer is slow to import)."""

from .auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                   AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification,
                   AutoPeftModelForTokenClassification)
from .hf_adapters import add_adapter_api, inject_adapter_in_model
from .kbit import prepare_model_for_kbit_training
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status


def __getattr__(name: str):
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
           "AutoPeftModelForTokenClassification", "Trainer", "TunerLayerStatus", "TunerModelStatus", "add_adapter_api",
           "get_layer_status", "get_model_status", "inject_adapter_in_model", "prepare_model_for_kbit_training"]
