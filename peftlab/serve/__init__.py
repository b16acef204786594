"""`peftlab serve`: one base model, many adapters mixed in every batch, behind an OpenAI-compatible HTTP API.

- mixed.py: the mixed-adapter forward (stacked per-layer tables, one adapter per row; LoRA, rsLoRA, DoRA, IA3, VeRA);
- engine.py: continuous batching (rows join and leave at every decode step, each with its own KV positions);
- api.py: FastAPI endpoints (/v1/models, /v1/completions, /v1/chat/completions, /v1/adapters, /health).
"""

from __future__ import annotations

import os


def build_app(model: str, adapters: dict[str, str], allow_load_from: list[str] | None = None, max_batch: int = 32,
              max_queue: int = 256, max_context: int | None = None, dtype: str = "fp32", device: str = "cpu",
              served_name: str | None = None):
    """Load `model` (shipped name, folder or hub id) in `dtype` on `device` and the startup adapters {name: folder};
    return (app, engine). POST /v1/adapters may read only under the startup adapter folders and `allow_load_from`."""
    from transformers import AutoModelForCausalLM

    from ..models import load_model, load_tokenizer
    from .api import create_app
    from .engine import Engine

    tokenizer = load_tokenizer(model)
    base = load_model(model, auto_class=AutoModelForCausalLM, dtype=dtype).to(device).eval()
    engine = Engine(base, tokenizer, max_batch=max_batch, max_queue=max_queue, max_context=max_context)
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    name = served_name or os.path.basename(os.path.normpath(model))
    return create_app(engine, name, list(adapters.values()) + list(allow_load_from or [])), engine
