"""Conformance examples for LLaMA-Adapter: the conformance suite runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py). The zero gate makes it the identity at init; not a weight update, so merging is
refused (merges=False). Llama-like models only (as PEFT)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import AdaptionPromptConfig

EXAMPLES = [
    Ex("llama", lambda: AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type=TaskType.CAUSAL_LM),
       peft_round_trip=True, id="top_layer"),
    Ex("llama", lambda: AdaptionPromptConfig(adapter_len=3, adapter_layers=2, target_modules="self_attn"),
       peft_round_trip=True, id="all_layers"),
]
