"""Conformance examples for P-tuning: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import PromptEncoderConfig

# Random virtual tokens change the output from the start (no identity), and there is nothing to merge (merges=False).
# P-tuning loads for inference as PEFT loads it: a table of the encoder's saved output instead of the encoder
# (`encoder_output_on_load`), so only the output is compared there.
ENCODER_OUTPUT = {"encoder_output_on_load": True}

EXAMPLES = [
    Ex("llama", lambda: PromptEncoderConfig(num_virtual_tokens=4, task_type=TaskType.CAUSAL_LM),
       identity_at_init=False, flags=ENCODER_OUTPUT, peft_round_trip=True, id="causal_lm"),
    Ex("bert", lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                                           encoder_hidden_size=8, task_type=TaskType.SEQ_CLS),
       identity_at_init=False, flags=ENCODER_OUTPUT, peft_round_trip=True, id="seq_cls-lstm"),
    Ex("t5", lambda: PromptEncoderConfig(num_virtual_tokens=3, task_type=TaskType.SEQ_2_SEQ_LM),
       identity_at_init=False, flags=ENCODER_OUTPUT, peft_round_trip=True, id="seq2seq"),
]
