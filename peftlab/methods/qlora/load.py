"""Quantising at load: the targeted linear weights become NF4 as they are read from the checkpoint, so the
full-precision model is never held (peftlab.models.load_model(..., quantize=...) streams the other tensors).

`quantize_at_load(config)` returns the `quantize` argument: given the model on the meta device, the modules QLoRA
would target ({path: builder}), each builder making the NF4Linear that `NF4Linear.from_float` makes after a full
load, from the same tensor in the same dtype, so the codes and scales are the same bit for bit (tests check). The
wrapper `get_peft_model(model, QLoraConfig(...))` then finds NF4Linear bases already quantised with these settings
and only adds A and B. Modules the load missed (a config that targets more later) are quantised by the wrapper as
before; modules quantised here but not targeted later run as frozen NF4 layers.

Kernels: as for a full load (QLoraConfig.backend): "auto" and "torch" quantise with peftlab's NF4 reference (the same
model with or without bitsandbytes), "bitsandbytes" with bitsandbytes' quantize_4bit; the stored format is the same.
"""

from __future__ import annotations

import functools

from torch import nn

from ...core.model import TASK_HEADS
from ...core.targets import is_linear_like, matches, output_head_names, resolve_target_spec, select_targets
from .config import QLoraConfig
from .layer import NF4Linear, QuantSettings


def quantize_at_load(config: QLoraConfig, default_targets: dict[str, list[str]]):
    """peftlab.models.load_model's `quantize` argument for `config` (the method's default targets as fallback)."""
    settings = QuantSettings.of(config)
    build = functools.partial(_build, settings=settings)

    def plan(model: nn.Module) -> dict[str, object]:
        spec = resolve_target_spec(config, model, default_targets, "qlora")
        # Heads are trained in full (modules_to_save) or tied to the embeddings: never quantised at load.
        heads = output_head_names(model) | {n for n, _ in model.named_modules()
                                            if any(matches(n, [h]) for hs in TASK_HEADS.values() for h in hs)}
        linear = {n for n, m in model.named_modules() if is_linear_like(m)}
        return {name: build for name in select_targets(model, config, spec) if name in linear and name not in heads}

    return plan


def _build(module: nn.Module, weight, settings: QuantSettings) -> NF4Linear:
    return NF4Linear.from_float(module, settings, weight)
