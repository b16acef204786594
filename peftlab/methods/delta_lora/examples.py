"""Conformance examples for Delta-LoRA: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import DeltaLoraConfig

# Delta-LoRA moves the adapted layers' base weights during training by design (W += lambda * change of s B A after
# update_start_step steps): `base_weights_train` makes the training test check that exactly those moved and everything
# else stayed. Its files carry those base weights, which PEFT has no place for: no PEFT round trip.
MOVES_BASE = {"base_weights_train": True}

EXAMPLES = [
    Ex("llama", lambda: DeltaLoraConfig(r=4, lora_alpha=8, update_start_step=5, task_type=TaskType.CAUSAL_LM),
       flags=MOVES_BASE, id="causal_lm"),
    Ex("gpt2", lambda: DeltaLoraConfig(r=4, update_start_step=0, task_type=TaskType.CAUSAL_LM, bias="lora_only"),
       flags=MOVES_BASE, id="bias_lora_only"),
    Ex("bert", lambda: DeltaLoraConfig(r=4, update_start_step=2, task_type=TaskType.SEQ_CLS),
       identity_at_init=False, flags=MOVES_BASE, id="seq_cls"),  # new head: not identity
    Ex("t5", lambda: DeltaLoraConfig(r=4, update_start_step=3, delta_lambda=1.0, target_modules=["q", "v", "wo"],
                                     task_type=TaskType.SEQ_2_SEQ_LM), flags=MOVES_BASE, id="seq2seq"),
]
