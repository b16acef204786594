"""LN tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning"; HF
PEFT's LN_TUNING): only the normalisation layers train (LayerNorm / RMSNorm weights and biases), each as a copy
beside the frozen base module.

    LayerNorm: y = (x - mean(x)) / sqrt(var(x) + eps) * γ' + β'      RMSNorm: y = x / sqrt(mean(x^2) + eps) * γ'
with γ', β' the adapter's copy of γ, β (equal at init: the identity). SmolLM2-135M: 61 RMSNorm weights of 576 =
35,136 trained numbers (0.026%).

Files: PEFT's layout and keys (`base_model.model.<path>.ln_tuning_layers.weight`, `.bias` for LayerNorm), peft_type
LN_TUNING: PEFT reads peftlab's files and the other way round (tests/test_method_ln_tuning.py). Merging writes the
copy's values into the base module (layer.py).
"""

from __future__ import annotations

from torch import nn

from ...core.method import Method, register
from .config import DEFAULT_TARGETS, LNTuningConfig
from .layer import LNTuningLayer


def _has_own_parameters(module: nn.Module) -> bool:
    """PEFT wraps whatever module is named; a copy only trains something if the module holds parameters itself."""
    return any(True for _ in module.parameters(recurse=False))


METHOD = register(Method(
    name="ln_tuning",
    config_cls=LNTuningConfig,
    layers=((_has_own_parameters, LNTuningLayer),),
    summary="LN tuning: trained copies of the LayerNorm/RMSNorm layers replace them (files: LN_TUNING)",
    default_targets=DEFAULT_TARGETS,
))

__all__ = ["LNTuningConfig", "LNTuningLayer", "METHOD"]
