"""OFT's rows in the conformance suite (peftlab/core/examples.py)."""

from ...core.examples import ConformanceExample
from .config import OFTConfig

EXAMPLES = [
    ConformanceExample("llama", lambda: OFTConfig(oft_block_size=8, task_type="CAUSAL_LM"), peft_round_trip=True,
                       id="llama-qv"),
    ConformanceExample("llama", lambda: OFTConfig(r=4, oft_block_size=0, target_modules="all-linear", coft=True,
                                                  eps=1.0, bias="oft_only"),  # a radius the 30-step check can move in
                       peft_round_trip=True, id="llama-all-linear-coft"),
    ConformanceExample("llama", lambda: OFTConfig(oft_block_size=16, block_share=True, use_cayley_neumann=False,
                                                  module_dropout=0.25),
                       peft_round_trip=True, id="llama-block-share-exact-cayley"),
    # GPT-2's c_attn is a transformers Conv1D, which PEFT's OFT does not wrap: no PEFT round trip.
    ConformanceExample("gpt2", lambda: OFTConfig(oft_block_size=8, task_type="CAUSAL_LM"), id="gpt2-conv1d"),
    # A new classifier head (modules_to_save) starts random: not identity at init.
    ConformanceExample("bert", lambda: OFTConfig(oft_block_size=8, task_type="SEQ_CLS"), identity_at_init=False,
                       peft_round_trip=True, id="bert-cls"),
    ConformanceExample("t5", lambda: OFTConfig(oft_block_size=8, task_type="SEQ_2_SEQ_LM", layers_to_transform=[1]),
                       peft_round_trip=True, id="t5-layer1"),
]
