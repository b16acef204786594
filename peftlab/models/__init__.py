"""Models to fine-tune: the shipped default (`"smollm2"`, no download needed), local folders and hub ids, loaded in
the dtype asked for (`dtype.py`), streamed tensor by tensor from safetensors (`loading.py`)."""

from .dtype import DTYPE_CHOICES, DTYPES, DtypeError, describe, resolve_dtype
from .loading import CheckpointFormatError, checkpoint_files, load_model, local_folder
from .shipped import (DEFAULT_SHIPPED, SHIPPED_MODELS, ModelSourceError, ShippedModel, ShippedModelError,
                      cache_root, cached_shipped_path, load_config, load_tokenizer, resolve_model, shipped_gguf,
                      shipped_model_path)

__all__ = [
    "DEFAULT_SHIPPED", "DTYPES", "DTYPE_CHOICES", "SHIPPED_MODELS", "CheckpointFormatError", "DtypeError",
    "ModelSourceError", "ShippedModel", "ShippedModelError", "cache_root", "cached_shipped_path", "checkpoint_files",
    "describe", "load_config", "load_model", "load_tokenizer", "local_folder", "resolve_dtype", "resolve_model",
    "shipped_gguf", "shipped_model_path",
]
