"""LoRA initialisers: a table from the config's `init_lora_weights` value to a function.

Each function takes (layer, adapter_name) and fills that adapter's A and B in place. New schemes (PiSSA,
OLoRA, ...) are new rows; a function may also rewrite the base weight (PiSSA's residual) through `layer`.
Shapes: Linear/Conv1D A (r, in), B (out, r); Embedding A (r, vocab), B (dim, r); Conv2d A (r, in, kh, kw),
B (out, r, 1, 1).
"""

from __future__ import annotations

import math

from torch import nn


def _identity_start(layer, name: str) -> None:
    """A random, B zero: the update B A starts at zero. For embeddings the roles swap (A zero, B normal)
    because a one-hot input makes a zero A the natural "no change" start, as in the LoRA reference code."""
    A, B = layer.lora_pair(name)
    if layer.is_embedding:
        nn.init.zeros_(A)
        nn.init.normal_(B)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's own default init
        nn.init.zeros_(B)


def _gaussian(layer, name: str) -> None:
    """A normal with std 1/r, B zero (embeddings as in the default)."""
    A, B = layer.lora_pair(name)
    if layer.is_embedding:
        return _identity_start(layer, name)
    nn.init.normal_(A, std=1 / layer.r[name])
    nn.init.zeros_(B)


def _random(layer, name: str) -> None:
    """A and B both random, so the adapter changes the output from the start (for tests)."""
    A, B = layer.lora_pair(name)
    if layer.is_embedding:
        nn.init.normal_(A)
        nn.init.normal_(B)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))


INITIALIZERS = {
    "default": _identity_start,
    "gaussian": _gaussian,
    "random": _random,
}


def init_key(value: bool | str) -> str:
    """Map the config value (PEFT's: True, False or a name) to a row of INITIALIZERS."""
    if value is True:
        return "default"
    if value is False:
        return "random"
    if isinstance(value, str):
        return value.lower()
    raise TypeError(f"init_lora_weights must be True, False or a name, not {value!r}")
