"""Conformance examples for LoRA-drop: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import LoraDropConfig

# LoRA-drop is plain LoRA until its `prepare` hook (phase 1 + sharing) runs in `peftlab train`, so every generic check
# applies as it is (its files are plain LoRA files); sharing is checked in tests/test_method_lora_drop.py.
EXAMPLES = [
    Ex("llama", lambda: LoraDropConfig(r=4, lora_alpha=8, task_type=TaskType.CAUSAL_LM), peft_round_trip=True,
       id="causal_lm"),
    Ex("gpt2", lambda: LoraDropConfig(r=4, task_type=TaskType.CAUSAL_LM, bias="lora_only", lora_dropout=0.1),
       peft_round_trip=True, id="bias_lora_only-dropout"),
    Ex("bert", lambda: LoraDropConfig(r=4, task_type=TaskType.SEQ_CLS), identity_at_init=False,  # new head
       peft_round_trip=True, id="seq_cls"),
]
