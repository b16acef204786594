"""Conformance examples for prompt tuning: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import PromptTuningConfig

# Random virtual rows change the output from the start (no identity), and there is nothing to merge (merges=False).
EXAMPLES = [
    Ex("llama", lambda: PromptTuningConfig(num_virtual_tokens=4, task_type=TaskType.CAUSAL_LM),
       identity_at_init=False, peft_round_trip=True, id="causal_lm"),
    # No task_type: PEFT's plain PeftModel (no task class) does not prepend the virtual tokens, so no PEFT round trip.
    # (4 virtual tokens: with 2, GPT-2's one-batch loss fell by 10% within the training test's 30 steps for only some
    # seeds of the random init; with 4 for every seed tried, by step 20)
    Ex("gpt2", lambda: PromptTuningConfig(num_virtual_tokens=4), identity_at_init=False, id="no_task"),
    Ex("bert", lambda: PromptTuningConfig(num_virtual_tokens=4, task_type=TaskType.SEQ_CLS), identity_at_init=False,
       peft_round_trip=True, id="seq_cls"),
    # (T5 trains with dropout 0.1: 16 virtual tokens get its one-batch loss down within the training test's steps)
    Ex("t5", lambda: PromptTuningConfig(num_virtual_tokens=16, task_type=TaskType.SEQ_2_SEQ_LM),
       identity_at_init=False, peft_round_trip=True, id="seq2seq"),
]
