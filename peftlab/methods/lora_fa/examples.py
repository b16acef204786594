"""Conformance examples for LoRA-FA (its files are plain LoRA files): tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import LoraFaConfig

EXAMPLES = [
    Ex("llama", lambda: LoraFaConfig(r=4, lora_alpha=8, task_type=TaskType.CAUSAL_LM), peft_round_trip=True,
       id="causal_lm"),
    Ex("llama", lambda: LoraFaConfig(r=4, target_modules="all-linear", lora_dropout=0.1), peft_round_trip=True,
       id="all_linear-dropout"),
    Ex("gpt2", lambda: LoraFaConfig(r=4, task_type=TaskType.CAUSAL_LM, bias="lora_only"), peft_round_trip=True,
       id="bias_lora_only"),
    Ex("bert", lambda: LoraFaConfig(r=4, task_type=TaskType.SEQ_CLS), identity_at_init=False,  # new head: not identity
       peft_round_trip=True, id="seq_cls"),
]
