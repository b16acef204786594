"""Conformance examples for AdaLoRA: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import AdaLoraConfig

# E starts at zero (identity). total_step=10 is the conformance training test's least number of steps
# (tests/test_conformance.py, MIN_TRAIN_STEPS), so that its on_step calls run the whole budget schedule (warm-up,
# pruning, final pattern).
EXAMPLES = [
    Ex("llama", lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, tinit=2, tfinal=3,
                                      task_type=TaskType.CAUSAL_LM), peft_round_trip=True, id="causal_lm"),
    Ex("llama", lambda: AdaLoraConfig(init_r=4, target_r=1, total_step=10, tinit=1, tfinal=2, deltaT=2,
                                      target_modules="all-linear", lora_dropout=0.1), peft_round_trip=True,
       id="all_linear-dropout"),
    Ex("gpt2", lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, task_type=TaskType.CAUSAL_LM,
                                     bias="lora_only"), peft_round_trip=True, id="bias_lora_only"),
    Ex("bert", lambda: AdaLoraConfig(init_r=4, total_step=10, target_r=2, task_type=TaskType.SEQ_CLS),
       identity_at_init=False, peft_round_trip=True, id="seq_cls"),  # new head: not identity
    Ex("t5", lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, task_type=TaskType.SEQ_2_SEQ_LM),
       peft_round_trip=True, id="seq2seq"),
]
