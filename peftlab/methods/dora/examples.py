"""Conformance examples for DoRA (PEFT's LoraConfig(use_dora=True)): tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import DoraConfig

EXAMPLES = [
    Ex("llama", lambda: DoraConfig(r=4, lora_alpha=8, task_type=TaskType.CAUSAL_LM), peft_round_trip=True,
       id="causal_lm"),
    Ex("llama", lambda: DoraConfig(r=4, target_modules="all-linear", use_rslora=True, lora_dropout=0.1),
       peft_round_trip=True, id="all_linear-rslora"),
    Ex("llama", lambda: DoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], rank_pattern={"q_proj": 3}),
       peft_round_trip=True, id="embedding-rank_pattern"),
    Ex("gpt2", lambda: DoraConfig(r=4, task_type=TaskType.CAUSAL_LM, bias="lora_only"), peft_round_trip=True,
       id="bias_lora_only"),
    Ex("bert", lambda: DoraConfig(r=4, task_type=TaskType.SEQ_CLS), identity_at_init=False,  # new head: not identity
       peft_round_trip=True, id="seq_cls"),
    Ex("t5", lambda: DoraConfig(r=4, task_type=TaskType.SEQ_2_SEQ_LM, target_modules=["q", "v", "wo"]),
       peft_round_trip=True, id="seq2seq"),
]
