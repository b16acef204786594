"""PromptTuningConfig: PEFT's names and defaults (Lester et al. 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import ConfigError, check_choice
from .prompt_learning import PromptLearningConfig

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: num_virtual_tokens trainable embeddings (T x hidden size) put before every input's embeddings;
    the model itself stays frozen."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    """How the virtual tokens start: "RANDOM" (N(0, 1) rows, may lie far from real token embeddings), "TEXT" (the
    embeddings of prompt_tuning_init_text's tokens, repeated or cut to num_virtual_tokens; needs
    tokenizer_name_or_path), or "SAMPLE_VOCAB" (embeddings of tokens drawn at random from the vocabulary)."""

    prompt_tuning_init_text: str | None = None
    """The text whose token embeddings start the virtual tokens when prompt_tuning_init="TEXT", e.g. "Classify if
    the review is positive or negative:"."""

    tokenizer_name_or_path: str | None = None
    """The tokenizer that turns prompt_tuning_init_text into tokens (prompt_tuning_init="TEXT"): a local folder,
    a shipped model name ("smollm2") or a hub id; use the base model's own."""

    tokenizer_kwargs: dict | None = None
    """Extra arguments for loading that tokenizer (prompt_tuning_init="TEXT" only); trust_remote_code is ignored."""

    def __post_init__(self) -> None:
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # PEFT's str enum -> its value
        self.prompt_tuning_init = init
        check_choice("PromptTuningConfig", "prompt_tuning_init", init, INITS)
        super().__post_init__()
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the base "
                              "model's tokenizer: a folder, 'smollm2' or a hub id) to turn prompt_tuning_init_text "
                              f"into tokens; it is {self.tokenizer_name_or_path!r}.")
        if init == "TEXT" and not self.prompt_tuning_init_text:
            raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text "
                              "whose token embeddings start the virtual tokens; it is "
                              f"{self.prompt_tuning_init_text!r}.")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ConfigError(f"PromptTuningConfig: tokenizer_kwargs is set but prompt_tuning_init={init!r}; the "
                              "tokenizer is only loaded for prompt_tuning_init='TEXT'. Remove tokenizer_kwargs.")
