"""LoKr's rows in the conformance suite (peftlab/core/examples.py)."""

from ...core.examples import ConformanceExample
from .config import LoKrConfig

EXAMPLES = [
    ConformanceExample("llama", lambda: LoKrConfig(r=4, alpha=8, task_type="CAUSAL_LM"), peft_round_trip=True,
                       id="llama-qv"),
    ConformanceExample("llama", lambda: LoKrConfig(r=2, target_modules="all-linear", decompose_both=True,
                                                   decompose_factor=4, rank_dropout=0.1, rank_dropout_scale=True,
                                                   init_weights="lycoris"),
                       peft_round_trip=True, id="llama-all-linear-decompose-both-lycoris"),
    # GPT-2's c_attn is a transformers Conv1D, which PEFT's LoKr does not wrap: no PEFT round trip.
    ConformanceExample("gpt2", lambda: LoKrConfig(r=4, task_type="CAUSAL_LM"), id="gpt2-conv1d"),
    # A new classifier head (modules_to_save) starts random: not identity at init.
    ConformanceExample("bert", lambda: LoKrConfig(r=4, task_type="SEQ_CLS"), identity_at_init=False,
                       peft_round_trip=True, id="bert-cls"),
    ConformanceExample("t5", lambda: LoKrConfig(r=4, task_type="SEQ_2_SEQ_LM", layers_to_transform=[1]),
                       peft_round_trip=True, id="t5-layer1"),
]
