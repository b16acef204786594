"""AdaptionPromptConfig: HF PEFT's names and file layout (ADAPTION_PROMPT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...core.config import AdapterConfig, ConfigError, check_number

# model_type -> the attention submodules' name (PEFT's TRANSFORMERS_MODEL_CONFIG, for the Llama-like models).
DEFAULT_TARGET = {"llama": "self_attn", "mistral": "self_attn"}


@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """LLaMA-Adapter (Zhang et al. 2023): adapter_len trainable prompt vectors per layer in the top adapter_layers
    attention layers, attended to through a zero-initialised gate. Llama-like models (model_type llama, mistral)."""

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"
    # PEFT's AdaptionPromptConfig has none of these: its files hold only the fields below (and the common ones).
    file_omits: ClassVar[tuple[str, ...]] = ("exclude_modules", "modules_to_save", "layers_to_transform",
                                             "layers_pattern")

    target_modules: list[str] | str | None = None
    """The name of the attention submodules (PEFT's: a plain name, not a pattern), e.g. "self_attn" (the default
    for llama and mistral). The top `adapter_layers` modules with that name get prompts. (Once the adapter is on a
    model this holds their full paths; files keep the plain name.)"""

    adapter_len: int | None = None
    """Number of prompt vectors per adapted layer (the paper's K; it used 10). Required."""

    adapter_layers: int | None = None
    """Number of layers, counted from the top, that get prompts (the paper's L; it used 30 of LLaMA-7B's 32).
    Required."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for field in ("adapter_len", "adapter_layers"):
            if getattr(self, field) is None:
                raise ConfigError(f"{name}.{field} is not set; it is required, e.g. "
                                  "AdaptionPromptConfig(adapter_len=10, adapter_layers=30).")
            check_number(name, field, getattr(self, field), low=1, integer=True)
        given = [f for f in self.file_omits if getattr(self, f) not in (None, [], "")]
        if given:
            value = getattr(self, given[0])
            raise ConfigError(
                f"{name}.{given[0]}={value!r}: LLaMA-Adapter files (PEFT's) cannot hold it. It adapts the top "
                "adapter_layers attention layers (set adapter_layers) and saves no other module, so a task head "
                "(task_type SEQ_CLS adds one to modules_to_save) would not be saved: use task_type CAUSAL_LM, or "
                "another method (lora, prefix_tuning) for classification.")
        paths = self.target_modules
        if isinstance(paths, list) and len({p.rsplit(".", 1)[-1] for p in paths}) != 1:
            raise ConfigError(f"{name}.target_modules={paths!r}: give the attention submodules' name as one string, "
                              "e.g. 'self_attn'.")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(self.target_modules, list):  # resolved paths -> the plain name PEFT writes and reads
            out["target_modules"] = self.target_modules[0].rsplit(".", 1)[-1]
        return out
