"""Example configurations a method folder declares for the conformance suite.

Each method folder may hold an `examples.py` with `EXAMPLES: list[ConformanceExample]`. tests/test_conformance.py
builds its rows from `registered_methods()` and these lists, so a new method joins the suite from its own folder
without editing the test file.

`arch` names a tiny test architecture built in code ("llama", "gpt2", "bert", "t5"; see tests/conftest.py).
`flags` relax a generic invariant that truly does not hold for that example, each with the reason written beside it
in the method's examples.py: "base_weights_train" (the method moves the adapted layers' base weights, Delta-LoRA),
"quantised_base" (the base it computes on is the dequantised 4-bit one, QLoRA), "trains_base_in_place" (the adapter
*is* base parameters: full fine-tuning, BitFit, ...), "encoder_output_on_load" (loaded for inference, the prompt
encoder becomes a table of its saved output, as PEFT loads it, so save -> load and the round trip compare outputs,
not the encoder's tensors: P-tuning, prefix tuning with its projection). `peft_round_trip` asks the suite to check
that HF PEFT loads the saved files and computes the same outputs, and that peftlab loads PEFT's files back (set it
where PEFT has the method with the same file layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ConformanceExample:
    arch: str
    make_config: Callable[[], Any]
    identity_at_init: bool = True
    flags: dict[str, bool] = field(default_factory=dict)
    peft_round_trip: bool = False
    id: str = ""  # a short readable test id; the suite numbers examples when it is empty
