"""LoHa's rows in the conformance suite (peftlab/core/examples.py)."""

from ...core.examples import ConformanceExample
from .config import LoHaConfig

EXAMPLES = [
    ConformanceExample("llama", lambda: LoHaConfig(r=4, alpha=8, task_type="CAUSAL_LM"), peft_round_trip=True,
                       id="llama-qv"),
    ConformanceExample("llama", lambda: LoHaConfig(r=2, target_modules="all-linear", rank_dropout=0.1,
                                                   module_dropout=0.1, rank_pattern={"down_proj": 3}),
                       peft_round_trip=True, id="llama-all-linear-dropouts"),
    # GPT-2's c_attn is a transformers Conv1D, which PEFT's LoHa does not wrap: no PEFT round trip.
    ConformanceExample("gpt2", lambda: LoHaConfig(r=4, task_type="CAUSAL_LM"), id="gpt2-conv1d"),
    # A new classifier head (modules_to_save) starts random: not identity at init.
    ConformanceExample("bert", lambda: LoHaConfig(r=4, task_type="SEQ_CLS"), identity_at_init=False,
                       peft_round_trip=True, id="bert-cls"),
    ConformanceExample("t5", lambda: LoHaConfig(r=4, task_type="SEQ_2_SEQ_LM", layers_to_transform=[1]),
                       peft_round_trip=True, id="t5-layer1"),
]
