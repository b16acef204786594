"""Conformance examples for LoRA+ (its files are plain LoRA files): tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import LoraPlusConfig

EXAMPLES = [
    Ex("llama", lambda: LoraPlusConfig(r=4, target_modules=["embed_tokens", "q_proj", "v_proj"], loraplus_lr_ratio=4),
       peft_round_trip=True, id="embedding-ratio4"),
    Ex("gpt2", lambda: LoraPlusConfig(r=4, task_type=TaskType.CAUSAL_LM, bias="all"), peft_round_trip=True,
       id="bias_all"),
    Ex("bert", lambda: LoraPlusConfig(r=4, task_type=TaskType.SEQ_CLS), identity_at_init=False,  # new head
       peft_round_trip=True, id="seq_cls"),
]
