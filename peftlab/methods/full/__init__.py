"""Full fine-tuning as a method: every parameter of the base model trains, in place.

It runs through the same loop, counts and files as the adapters, so `peftlab compare` can put it beside them. Its
"adapter" is the whole model: the file holds every parameter (`base_model.model.<path>`), as large as the model.
A task head (SEQ_CLS's new classifier) is a modules_to_save copy like for every other method.
"""

from __future__ import annotations

from torch import nn

from ...core.method import Method, register
from ...core.targets import matches
from .config import FullConfig


def all_parameters(model: nn.Module, config: FullConfig) -> dict[str, nn.Parameter]:
    """Every parameter of `model` except those of modules matched by `exclude_modules` (e.g. ["embed_tokens"] keeps
    the 49k x 576 embedding of SmolLM2 frozen). Tied parameters appear once (named_parameters removes duplicates)."""
    excluded = [n for n, _ in model.named_modules() if n and matches(n, config.exclude_modules)]
    return {n: p for n, p in model.named_parameters()
            if not any(n.startswith(f"{m}.") for m in excluded)}


METHOD = register(Method(
    name="full",
    config_cls=FullConfig,
    layers=(),
    summary="Full fine-tuning: every base parameter trains in place (exclude_modules keeps some frozen)",
    base_tensors=all_parameters,
))

__all__ = ["FullConfig", "METHOD"]
