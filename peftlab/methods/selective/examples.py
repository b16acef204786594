"""Conformance examples for selective fine-tuning: the conformance suite runs every generic invariant on each row
(fields and flags: peftlab/core/examples.py). The rows are what `get_peft_model` builds: each candidate tensor's
seeded random `density` fraction, values 0 (identity); the Fisher selection (prepare / select) is tested in
tests/test_method_selective.py. No PEFT round trip: PEFT has no such method."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import SelectiveConfig

# density 0.1: 100 of a tiny model's 1,024-entry weights, enough for the suite's one-batch loss to fall in its steps.
EXAMPLES = [
    Ex("llama", lambda: SelectiveConfig(density=0.1, task_type=TaskType.CAUSAL_LM), id="causal_lm"),
    Ex("gpt2", lambda: SelectiveConfig(density=0.1, scope="per_tensor", task_type=TaskType.CAUSAL_LM),
       id="conv1d"),
    Ex("bert", lambda: SelectiveConfig(density=0.1, task_type=TaskType.SEQ_CLS), identity_at_init=False,
       id="seq_cls"),  # new head: not identity
    Ex("t5", lambda: SelectiveConfig(density=0.1, target_modules=["q", "v", "wo"], task_type=TaskType.SEQ_2_SEQ_LM),
       id="seq2seq"),
]
