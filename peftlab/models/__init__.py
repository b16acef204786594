"""Models to fine-tune: the shipped default (`"smollm2"`, no download needed), local folders and hub ids."""

from .shipped import (DEFAULT_SHIPPED, SHIPPED_MODELS, ModelSourceError, ShippedModel, ShippedModelError,
                      cache_root, cached_shipped_path, load_config, load_model, load_tokenizer, resolve_model,
                      shipped_gguf, shipped_model_path)

__all__ = [
    "DEFAULT_SHIPPED", "SHIPPED_MODELS", "ModelSourceError", "ShippedModel", "ShippedModelError", "cache_root",
    "cached_shipped_path", "load_config", "load_model", "load_tokenizer", "resolve_model", "shipped_gguf",
    "shipped_model_path",
]
