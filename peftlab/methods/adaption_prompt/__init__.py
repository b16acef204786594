"""LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention"; HF PEFT's ADAPTION_PROMPT): adapter_len trainable prompt vectors in each of the top adapter_layers
attention layers, attended to by the layer's queries through a separate softmax scaled by a zero-initialised gate
(the equations are in layer.py). The rest of the model stays frozen; the branch is not a weight update, so it does
not merge (merging raises).

Models: Llama-like attention (model_type llama, mistral: q/k/v/o projections, rotary position embeddings handed to
the attention module), as PEFT 0.21.2, which also has a GPT-2 variant (not here). SmolLM2 is a llama.

Files: PEFT's layout: adapter_config.json with target_modules "self_attn", adapter_len, adapter_layers; keys
`base_model.model.<path>.self_attn.adaption_prompt` (1, adapter_len, hidden) and `.adaption_gate` (1,) (no adapter
name inside, as PEFT writes them). PEFT 0.21.2 runs under transformers 5.25 for these models; files cross both ways
with the same logits (tests/test_method_adaption_prompt.py).
"""

from __future__ import annotations

import dataclasses

from ...core.config import ConfigError
from ...core.method import Method, register
from .config import DEFAULT_TARGET, AdaptionPromptConfig
from .layer import AdaptedAttention, is_llama_attention


def top_layers(model, config: AdaptionPromptConfig) -> AdaptionPromptConfig:
    """`Method.complete_config`: the config with target_modules = the full paths of the top adapter_layers modules
    named target_modules (PEFT's rule: the last ones in model order whose name ends with "." + it)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET:
        raise ConfigError(f"adaption_prompt supports Llama-like models (model_type {', '.join(DEFAULT_TARGET)}); this "
                          f"model is {model_type!r}. Use lora or prefix_tuning for it.")
    target = config.target_modules or DEFAULT_TARGET[model_type]
    leaf = target[0].rsplit(".", 1)[-1] if isinstance(target, list) else target
    found = [n for n, _ in model.named_modules() if n.endswith(f".{leaf}")]
    if len(found) < config.adapter_layers:
        raise ConfigError(f"AdaptionPromptConfig.adapter_layers={config.adapter_layers} but the model has "
                          f"{len(found)} modules named {leaf!r}; set adapter_layers to at most {len(found)}.")
    return dataclasses.replace(config, target_modules=found[-config.adapter_layers:])


METHOD = register(Method(
    name="adaption_prompt",
    config_cls=AdaptionPromptConfig,
    layers=((is_llama_attention, AdaptedAttention),),
    summary="LLaMA-Adapter: gated prompts (zero-init gate) in the top adapter_layers attention layers "
            "(files: ADAPTION_PROMPT)",
    complete_config=top_layers,
    merges=False,
))

__all__ = ["AdaptedAttention", "AdaptionPromptConfig", "METHOD"]
