"""LNTuningConfig: HF PEFT's names and defaults (LN_TUNING)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig, ConfigError

# PEFT 0.21.2's default targets per model_type (peft.utils.constants.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_
# MAPPING), so that a config without target_modules adapts the same modules in both libraries.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


@dataclass
class LNTuningConfig(AdapterConfig):
    """LN tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"): each targeted module (LayerNorm / RMSNorm, or
    any module named) gets a trainable copy per adapter, which computes in its place while the adapter is active;
    the base modules stay frozen. target_modules None: PEFT's default norms for the model type (Llama:
    input_layernorm, post_attention_layernorm, norm)."""

    peft_type: ClassVar[str] = "LN_TUNING"
    # PEFT's LNTuningConfig has no layer filter: its files hold neither key, so peftlab's refuse them (a regex
    # target_modules names layers, e.g. r".*layers\.(0|1)\.input_layernorm").
    file_omits: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern")

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [f for f in self.file_omits if getattr(self, f) not in (None, [], "")]
        if given:
            raise ConfigError(f"LNTuningConfig.{given[0]}={getattr(self, given[0])!r}: LN tuning files (PEFT's) have no "
                              "layer filter. Name the layers in target_modules instead, e.g. "
                              r"r'.*layers\.(0|1)\.input_layernorm'.")
