"""BitFit (Ben Zaken et al., 2022): train only the bias terms of the base model (plus a new task head).

The biases train in place (they are small: 0.1% of BERT-base), and are saved as the adapter. Models without biases
(Llama, Mistral, Qwen3 and most recent decoders keep none in their linear layers or norms) cannot use it: the
config is refused with the model type named.
"""

from __future__ import annotations

from torch import nn

from ...core.config import ConfigError
from ...core.method import Method, register
from ...core.targets import matches
from .config import BitFitConfig


def bias_parameters(model: nn.Module, config: BitFitConfig) -> dict[str, nn.Parameter]:
    """{"<module path>.bias": parameter} for every module whose `bias` is a parameter, filtered by the config."""
    found = {}
    for name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, nn.Parameter) or bias not in set(module.parameters(recurse=False)):
            continue
        if config.target_modules is not None and not matches(name, config.target_modules):
            continue
        if matches(name, config.exclude_modules):
            continue
        found[f"{name}.bias" if name else "bias"] = bias
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        what = f" among modules matching target_modules={config.target_modules!r}" if config.target_modules else ""
        raise ConfigError(
            f"BitFit found no bias parameter{what} in this {model_type} model: there is nothing to train. Many "
            "recent decoders (Llama, Mistral, Qwen3, SmolLM2) have no biases; use ia3 or lora for them, or widen "
            "target_modules.")
    return found


METHOD = register(Method(
    name="bitfit",
    config_cls=BitFitConfig,
    layers=(),
    summary="BitFit: only the base model's bias terms train (in place)",
    base_tensors=bias_parameters,
))

__all__ = ["BitFitConfig", "METHOD"]
