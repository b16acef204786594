"""Models to fine-tune: the shipped default (`"smollm2"`, no download needed), local folders and hub ids, loaded in
the dtype asked for (`dtype.py`), streamed tensor by tensor from safetensors (`loading.py`)."""

import importlib

# Imported on first use (PEP 562): peftlab.models.dtype's names are read by run-config checks before torch is
# imported, and importing this package must not pull in loading.py (torch, transformers) for them.
_EXPORTS = {
    **{n: ".dtype" for n in ("DTYPE_CHOICES", "DTYPES", "DtypeError", "describe", "resolve_dtype")},
    **{n: ".loading" for n in ("CheckpointFormatError", "checkpoint_files", "load_model", "local_folder")},
    **{n: ".shipped" for n in ("DEFAULT_SHIPPED", "SHIPPED_MODELS", "ModelSourceError", "ShippedModel",
                               "ShippedModelError", "cache_root", "cached_shipped_path", "load_config",
                               "load_tokenizer", "resolve_model", "shipped_gguf", "shipped_model_path")},
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


__all__ = [
    "DEFAULT_SHIPPED", "DTYPES", "DTYPE_CHOICES", "SHIPPED_MODELS", "CheckpointFormatError", "DtypeError",
    "ModelSourceError", "ShippedModel", "ShippedModelError", "cache_root", "cached_shipped_path", "checkpoint_files",
    "describe", "load_config", "load_model", "load_tokenizer", "local_folder", "resolve_dtype", "resolve_model",
    "shipped_gguf", "shipped_model_path",
]
