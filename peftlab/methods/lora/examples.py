"""Conformance examples for LoRA: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import LoraConfig

EXAMPLES = [
    Ex("llama", lambda: LoraConfig(r=4, lora_alpha=8, task_type=TaskType.CAUSAL_LM), peft_round_trip=True,
       id="causal_lm"),
    Ex("llama", lambda: LoraConfig(r=4, target_modules="all-linear", use_rslora=True, bias="lora_only",
                                   lora_dropout=0.1), peft_round_trip=True, id="all_linear-rslora-bias"),
    Ex("llama", lambda: LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights="gaussian",
                                   rank_pattern={"q_proj": 3}), peft_round_trip=True, id="embedding-rank_pattern"),
    Ex("gpt2", lambda: LoraConfig(r=4, task_type=TaskType.CAUSAL_LM, bias="all"), peft_round_trip=True,
       id="bias_all"),
    Ex("bert", lambda: LoraConfig(r=4, task_type=TaskType.SEQ_CLS), identity_at_init=False,  # new head: not identity
       peft_round_trip=True, id="seq_cls"),
    Ex("t5", lambda: LoraConfig(r=4, task_type=TaskType.SEQ_2_SEQ_LM, layers_to_transform=[1]), peft_round_trip=True,
       id="layers_to_transform"),
]
