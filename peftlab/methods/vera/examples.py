"""Conformance examples for VeRA: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import VeraConfig

EXAMPLES = [
    Ex("llama", lambda: VeraConfig(r=16, task_type=TaskType.CAUSAL_LM), peft_round_trip=True, id="causal_lm"),
    Ex("llama", lambda: VeraConfig(r=8, target_modules="all-linear", vera_dropout=0.1, bias="vera_only",
                                   save_projection=False), peft_round_trip=True, id="all_linear-no_projection"),
    Ex("gpt2", lambda: VeraConfig(r=8, task_type=TaskType.CAUSAL_LM, bias="all"), peft_round_trip=True,
       id="bias_all"),
    Ex("bert", lambda: VeraConfig(r=8, task_type=TaskType.SEQ_CLS), identity_at_init=False,  # new head: not identity
       peft_round_trip=True, id="seq_cls"),
    Ex("t5", lambda: VeraConfig(r=8, task_type=TaskType.SEQ_2_SEQ_LM, target_modules=["q", "v", "wo"]),
       peft_round_trip=True, id="seq2seq"),
]
