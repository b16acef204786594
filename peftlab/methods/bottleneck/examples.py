"""Conformance examples for bottleneck adapters: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import BottleneckConfig

# `up` starts at zero (identity); the adapter is non-linear, so merging is refused (Method.merges=False). PEFT has no
# bottleneck adapters: no PEFT round trip.
EXAMPLES = [
    Ex("llama", lambda: BottleneckConfig(reduction_factor=4, task_type=TaskType.CAUSAL_LM), id="causal_lm"),
    Ex("llama", lambda: BottleneckConfig(reduction_factor=8, placement="pfeiffer", non_linearity="gelu",
                                         adapter_dropout=0.1), id="pfeiffer-gelu-dropout"),
    Ex("gpt2", lambda: BottleneckConfig(reduction_factor=4, non_linearity="tanh"), id="tanh"),
    Ex("bert", lambda: BottleneckConfig(reduction_factor=4, placement="pfeiffer", task_type=TaskType.SEQ_CLS),
       identity_at_init=False, id="seq_cls-pfeiffer"),  # new head: not identity
    Ex("t5", lambda: BottleneckConfig(reduction_factor=4, non_linearity="silu", task_type=TaskType.SEQ_2_SEQ_LM),
       id="seq2seq-silu"),
]
