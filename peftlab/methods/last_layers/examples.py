"""Conformance examples for last-layers training: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from . import LastLayersConfig

EXAMPLES = [
    Ex("llama", lambda: LastLayersConfig(num_layers=1, task_type=TaskType.CAUSAL_LM), id="causal_lm"),
    Ex("gpt2", lambda: LastLayersConfig(num_layers=2, train_head=False), id="two_layers-no_head"),
    Ex("bert", lambda: LastLayersConfig(num_layers=1, task_type=TaskType.SEQ_CLS), identity_at_init=False,
       id="seq_cls"),  # new head: not identity
    Ex("t5", lambda: LastLayersConfig(num_layers=1, task_type=TaskType.SEQ_2_SEQ_LM), id="seq2seq"),
]
