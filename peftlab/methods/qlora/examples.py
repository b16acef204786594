"""Conformance examples for QLoRA: tests/test_conformance.py runs every generic invariant on each row (fields and
flags: peftlab/core/examples.py)."""

from __future__ import annotations

from ...core.config import TaskType
from ...core.examples import ConformanceExample as Ex
from .config import QLoraConfig

# QLoRA replaces the targeted base weights by 4-bit NF4 approximations when the adapter is added: the base it computes
# on (identity at init, disable_adapter, unload) is the dequantised one, not the fp32 model, and its files (plain LoRA
# files) reproduce it exactly on that base. `quantised_base` makes the reference model a copy of the freshly wrapped
# model with its adapters unloaded (= the dequantised base), and the save/load test load onto copies of it. Every other
# check runs unchanged (unmerge restores the 4-bit base exactly). No generic PEFT round trip: PEFT would load the file
# onto the fp32 base (tests/test_method_qlora.py compares against PEFT + bitsandbytes' maths).
Q = {"quantised_base": True}

EXAMPLES = [
    Ex("llama", lambda: QLoraConfig(r=4, lora_alpha=8, task_type=TaskType.CAUSAL_LM), flags=Q, id="causal_lm"),
    Ex("llama", lambda: QLoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, use_rslora=True,
                                    bnb_4bit_use_double_quant=False, bnb_4bit_blocksize=32, backend="torch"),
       flags=Q, id="all_linear-blocksize32-torch"),
    Ex("gpt2", lambda: QLoraConfig(r=4, task_type=TaskType.CAUSAL_LM, bias="lora_only"), flags=Q, id="bias_lora_only"),
    Ex("bert", lambda: QLoraConfig(r=4, task_type=TaskType.SEQ_CLS), identity_at_init=False, flags=Q,
       id="seq_cls"),  # new head: not identity
    Ex("t5", lambda: QLoraConfig(r=4, task_type=TaskType.SEQ_2_SEQ_LM, layers_to_transform=[1]), flags=Q,
       id="layers_to_transform"),
]
