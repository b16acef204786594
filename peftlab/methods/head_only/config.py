"""Output-layer-only's config, apart from the method's torch code: a run config is checked without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig


@dataclass
class HeadOnlyConfig(AdapterConfig):
    """Only the output layer trains (a copy of it, saved as modules_to_save). The head is found from the model:
    the task's head for SEQ_CLS/TOKEN_CLS/QUESTION_ANS, else `get_output_embeddings()` (lm_head)."""

    peft_type: ClassVar[str] = "HEAD_ONLY"
