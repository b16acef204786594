"""Training: one loop on Accelerate for every method and task mode (`peftlab train`)."""

import importlib

# Imported on first use (PEP 562): `peftlab train` reads and checks the run config (train/config.py, torch-free)
# before the loop (torch, transformers, accelerate) is imported.
_EXPORTS = {
    "TextClassifier": ".classifier",
    **{n: ".config" for n in ("RunConfig", "TrainConfig", "build_run_config", "load_run_config")},
    **{n: ".loop" for n in ("Trainer", "format_before_after", "train")},
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


__all__ = ["RunConfig", "TextClassifier", "TrainConfig", "Trainer", "build_run_config", "format_before_after",
           "load_run_config", "train"]
