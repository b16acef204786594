"""VeRA's config, with HF PEFT's field names and defaults (`peft.VeraConfig`) so files interchange."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig, check_choice, check_number

BIAS_MODES = ["none", "all", "vera_only"]


@dataclass
class VeraConfig(AdapterConfig):
    """VeRA (Kopiczko et al., 2024): W x + b * (B (d * (A x))), with A (r, in) and B (out, r) frozen random
    projections shared by every adapted layer and only the vectors d (r) and b (out) trained per layer."""

    peft_type: ClassVar[str] = "VERA"

    r: int = 256
    """Rank of the shared random projections (A is r x in_max, B is out_max x r). Higher than a LoRA rank:
    a layer trains only r + out numbers, however large r is."""

    projection_prng_key: int = 0
    """Seed of the shared projections A and B (Kaiming-uniform from a CPU torch.Generator, as PEFT draws them, so
    the same seed gives PEFT's A and B bit for bit). Loading an adapter saved with save_projection=False
    regenerates A and B from this seed."""

    save_projection: bool = True
    """Save A and B in the adapter file (keys base_model.vera_A / base_model.vera_B, r x in_max and out_max x r).
    False: the file holds only the per-layer vectors and loading regenerates A and B from projection_prng_key,
    which relies on torch's CPU generator giving the same numbers on the loading machine."""

    vera_dropout: float = 0.0
    """Dropout probability on the adapter branch's input only; the base path never sees dropout."""

    d_initial: float = 0.1
    """Initial value of every entry of the trainable vector d (vera_lambda_d); b (vera_lambda_b) starts at 0, so
    the adapter starts as identity. Small values (<= 0.1) are recommended by the paper (Table 6c)."""

    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as (in, out), as transformers' Conv1D (GPT-2) does;
    set automatically for Conv1D layers."""

    bias: str = "none"
    """Which biases train and are saved with the adapter: "none", "all" (every bias in the model) or
    "vera_only" (biases of the adapted layers)."""

    init_weights: bool = True
    """True: b = 0 and d = d_initial (identity at init). False: b = 1 and d ~ N(0, 1) (not identity; for tests),
    PEFT's values."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_number(name, "r", self.r, low=1, integer=True)
        check_number(name, "projection_prng_key", self.projection_prng_key, integer=True)
        check_number(name, "vera_dropout", self.vera_dropout, low=0, high=1, high_inclusive=False)
        check_number(name, "d_initial", self.d_initial)
        check_choice(name, "bias", self.bias, BIAS_MODES)
        check_choice(name, "save_projection", self.save_projection, [True, False])
        check_choice(name, "init_weights", self.init_weights, [True, False])
