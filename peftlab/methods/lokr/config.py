"""LoKr's config, with HF PEFT's field names and defaults (`peft.LoKrConfig`, peft_type "LOKR") so files
interchange."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import check_choice, check_number
from ..loha.lycoris_config import LycorisConfig


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
    Evaluation", §3): W + (alpha / r) W1 ⊗ W2, a Kronecker product of a small matrix W1 and a larger W2 (itself
    rank-r factorised when that saves parameters), see peftlab/methods/lokr/layer.py."""

    peft_type: ClassVar[str] = "LOKR"
    init_choices: ClassVar[tuple] = (True, False, "lycoris")

    decompose_both: bool = False
    """Also factorise W1 as W1a W1b of rank r (when r < max(W1's sides) / 2); by default W1 is a full matrix."""

    decompose_factor: int = -1
    """How each of out and in is split into two factors (out = a·b, in = c·d; W1 is (a, c), W2 (b, d)): -1 picks
    the most balanced divisor pair; a positive f takes f as the first factor where it divides the size, else the
    most balanced pair whose first factor is at most f."""

    rank_dropout_scale: bool = False
    """With rank_dropout: divide the kept rows by the kept fraction (LoHa always does; LoKr only with this)."""

    init_weights: bool | str = True
    """True: W1 (or W1a) zero and W2's factors Kaiming-uniform, so the update starts at zero; "lycoris": the
    LyCORIS repository's identity init instead (W1's factors random, W2 or W2b zero); False: every factor random
    (not identity; for tests). PEFT's values."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_choice(name, "decompose_both", self.decompose_both, [True, False])
        check_choice(name, "rank_dropout_scale", self.rank_dropout_scale, [True, False])
        check_number(name, "decompose_factor", self.decompose_factor, integer=True)
