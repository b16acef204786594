"""PromptLearningConfig: the fields prompt tuning, prefix tuning and P-tuning share (PEFT's PromptLearningConfig).

Kept apart from virtual_tokens.py (the forward and generate hooks, which need torch) so that the three configs
import no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig, ConfigError, TaskType, check_number

SUPPORTED_TASKS = (None, TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.SEQ_2_SEQ_LM)


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields every virtual-token method shares (PEFT's PromptLearningConfig). The model-shaped ones (token_dim,
    num_layers, num_attention_heads, num_transformer_submodules) are filled in from the model's config when None."""

    # PEFT's prompt-learning configs have no target fields (nothing is wrapped): leave them out of the file.
    file_omits: ClassVar[tuple[str, ...]] = ("target_modules", "exclude_modules", "layers_to_transform",
                                             "layers_pattern")
    prefix: ClassVar[bool] = False  # True: virtual keys/values per layer (prefix tuning); False: virtual embeddings

    num_virtual_tokens: int | None = None
    """How many virtual tokens T to put before every input (required, >= 1; e.g. 20). Each costs one position of
    the model's context."""

    token_dim: int | None = None
    """Width of one virtual token. Prompt tuning / P-tuning: the model's hidden size D. Prefix tuning: the key/value
    width per layer, num_key_value_heads x head_dim (D for models without grouped-query attention). None: from the
    model's config."""

    num_transformer_submodules: int | None = None
    """1, or 2 for encoder-decoder models (SEQ_2_SEQ_LM), where prompt tuning / P-tuning keep 2T virtual rows of which
    the encoder uses the first T (PEFT's layout). None: 2 for task_type SEQ_2_SEQ_LM, else 1."""

    num_attention_heads: int | None = None
    """Heads of the model's attention (prefix tuning: key/value heads, num_key_value_heads). None: from the model."""

    num_layers: int | None = None
    """Transformer layers of the model (prefix tuning puts a prefix into each). None: from the model."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.num_virtual_tokens is None:
            raise ConfigError(f"{name}.num_virtual_tokens is not set: give the number of virtual tokens to put before "
                              "every input, an integer >= 1 (e.g. num_virtual_tokens=20).")
        check_number(name, "num_virtual_tokens", self.num_virtual_tokens, low=1, integer=True)
        for field_name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, field_name)
            if value is not None:
                check_number(name, field_name, value, low=1, integer=True)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"{name}.num_transformer_submodules={self.num_transformer_submodules!r} is not valid; "
                              "use 1 (decoder-only or encoder-only models), 2 (encoder-decoder models) or None.")
        given = [f for f in self.file_omits if getattr(self, f) not in (None, [], "")]
        if given:
            raise ConfigError(f"{name} does not wrap modules, so {', '.join(given)} cannot be used: its virtual "
                              f"tokens act on the model's inputs (prefix tuning: on every layer's attention). Remove "
                              f"{given[0]}.")
        if self.task_type not in SUPPORTED_TASKS:
            shown = ", ".join(t.value for t in SUPPORTED_TASKS if t is not None)
            raise ConfigError(f"{name}.task_type={self.task_type.value!r} is not supported by peftlab's virtual-token "
                              f"methods; use one of: {shown} (or None to infer it from the model).")
