"""Conformance examples for full fine-tuning: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from . import FullConfig

# Full fine-tuning trains base parameters in place (the adapter *is* those parameters): merging has nothing to fold and
# disabling cannot give the original weights back (it warns); every other invariant holds.
IN_PLACE = {"trains_base_in_place": True}

EXAMPLES = [
    Ex("llama", lambda: FullConfig(task_type=TaskType.CAUSAL_LM), flags=IN_PLACE, id="causal_lm"),
    Ex("gpt2", lambda: FullConfig(exclude_modules=["wte", "wpe"]), flags=IN_PLACE, id="exclude_embeddings"),
    Ex("bert", lambda: FullConfig(task_type=TaskType.SEQ_CLS), identity_at_init=False, flags=IN_PLACE,
       id="seq_cls"),  # new head: not identity
    Ex("t5", lambda: FullConfig(task_type=TaskType.SEQ_2_SEQ_LM), flags=IN_PLACE, id="seq2seq"),
]
