"""Names that moved between transformers releases, read one way here so the rest of peftlab runs on both.

transformers renamed the KV-cache argument of `forward` / `generate` (and the output field) from `past_key_values`
to `cache` in the 5.2x releases; the old argument name is still accepted, with a deprecation warning, until 5.40.
peftlab reads a cache under either name and passes one under the name the model's forward declares, so the same code
runs on transformers 4.x and 5.x (the versions in constraints.txt are the tested ones).
"""

from __future__ import annotations

import inspect
from typing import Any

CACHE_KWARGS = ("cache", "past_key_values")
"""Every name a KV cache travels under in forward/generate keyword arguments, newest first."""


def cache_kwarg(model) -> str:
    """The name `model.forward` takes its KV cache under: "cache" (transformers >= 5.2x) or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def given_cache(kwargs: dict) -> tuple[str | None, Any]:
    """(name, cache) of the KV cache in `kwargs` under either name; (None, None) when neither key is present."""
    for key in CACHE_KWARGS:
        if key in kwargs:
            return key, kwargs[key]
    return None, None


def output_cache(output) -> Any:
    """The KV cache a model's forward returned (`output.cache`, or `output.past_key_values` before the rename)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
