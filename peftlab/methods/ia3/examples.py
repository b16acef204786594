"""Conformance examples for (IA)³: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import IA3Config

# The vectors start at 1 (identity); merging multiplies them into the weights (and output-scaled biases).
EXAMPLES = [
    Ex("llama", lambda: IA3Config(task_type=TaskType.CAUSAL_LM), peft_round_trip=True, id="causal_lm"),
    Ex("llama", lambda: IA3Config(target_modules="all-linear"), peft_round_trip=True,
       id="all_linear"),  # the feedforward default becomes a regex
    Ex("gpt2", lambda: IA3Config(task_type=TaskType.CAUSAL_LM), peft_round_trip=True, id="causal_lm"),
    Ex("bert", lambda: IA3Config(task_type=TaskType.SEQ_CLS), identity_at_init=False,  # new head: not identity
       peft_round_trip=True, id="seq_cls"),
    Ex("t5", lambda: IA3Config(task_type=TaskType.SEQ_2_SEQ_LM), peft_round_trip=True, id="seq2seq"),
]
