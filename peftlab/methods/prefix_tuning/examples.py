"""Conformance examples for prefix tuning: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import PrefixTuningConfig

# Random prefixes change the output from the start (no identity), and there is nothing to merge (merges=False).
# Projected prefixes load for inference as PEFT loads them: a table of the projection's saved output instead of the
# MLP (`encoder_output_on_load`), so only the output is compared there.
EXAMPLES = [
    Ex("llama", lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type=TaskType.CAUSAL_LM),
       identity_at_init=False, peft_round_trip=True, id="causal_lm"),
    Ex("llama", lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, task_type=TaskType.CAUSAL_LM),
       identity_at_init=False, flags={"encoder_output_on_load": True}, peft_round_trip=True, id="projection"),
    # No task_type: PEFT's plain PeftModel (no task class) does not pass the prefixes on, so no PEFT round trip.
    Ex("gpt2", lambda: PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero"), identity_at_init=False,
       id="zero_init"),
    # PEFT 0.21 refuses prefix tuning on transformers' BERT ("Model does not support past key values"): no round trip.
    Ex("bert", lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type=TaskType.SEQ_CLS), identity_at_init=False,
       id="seq_cls"),
    Ex("t5", lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type=TaskType.SEQ_2_SEQ_LM),
       identity_at_init=False, peft_round_trip=True, id="seq2seq"),
]
