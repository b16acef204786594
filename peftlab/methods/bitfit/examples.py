"""Conformance examples for BitFit: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from . import BitFitConfig

# BitFit trains the base model's biases in place (the adapter *is* those parameters): merging has nothing to fold and
# disabling cannot give the original biases back (it warns); every other invariant holds.
IN_PLACE = {"trains_base_in_place": True}

EXAMPLES = [
    Ex("gpt2", lambda: BitFitConfig(task_type=TaskType.CAUSAL_LM), flags=IN_PLACE, id="causal_lm"),
    Ex("bert", lambda: BitFitConfig(task_type=TaskType.SEQ_CLS), identity_at_init=False, flags=IN_PLACE,
       id="seq_cls"),  # new head: not identity
    Ex("bert", lambda: BitFitConfig(target_modules=["query", "intermediate.dense"], task_type=TaskType.SEQ_CLS),
       identity_at_init=False, flags=IN_PLACE, id="two_biases"),  # the paper's two-bias subset (+ the new head)
]
