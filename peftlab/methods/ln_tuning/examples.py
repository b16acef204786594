"""Conformance examples for LN tuning: the conformance suite runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py). The copies start equal to the norms (identity), train beside the frozen base, and
merge by replacing the base's values: no flag needed."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import LNTuningConfig

EXAMPLES = [
    Ex("llama", lambda: LNTuningConfig(task_type=TaskType.CAUSAL_LM), peft_round_trip=True, id="causal_lm"),
    Ex("gpt2", lambda: LNTuningConfig(task_type=TaskType.CAUSAL_LM), peft_round_trip=True,
       id="layernorm_bias"),
    Ex("bert", lambda: LNTuningConfig(target_modules=["LayerNorm"], task_type=TaskType.SEQ_CLS),
       identity_at_init=False, peft_round_trip=True, id="seq_cls"),  # new head: not identity
    Ex("t5", lambda: LNTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM), peft_round_trip=True, id="seq2seq"),
]
