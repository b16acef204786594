"""Conformance examples for output-layer-only training: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from . import HeadOnlyConfig

EXAMPLES = [
    Ex("llama", lambda: HeadOnlyConfig(task_type=TaskType.CAUSAL_LM), id="causal_lm"),
    Ex("gpt2", lambda: HeadOnlyConfig(), id="no_task"),
    Ex("bert", lambda: HeadOnlyConfig(task_type=TaskType.SEQ_CLS), identity_at_init=False,  # new head: not identity
       id="seq_cls"),
    Ex("t5", lambda: HeadOnlyConfig(task_type=TaskType.SEQ_2_SEQ_LM), id="seq2seq"),
]
