"""OFT's config, with HF PEFT 0.21's field names and defaults (`peft.OFTConfig`, peft_type "OFT") so files
interchange."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig, ConfigError, check_choice, check_number

BIAS_MODES = ["none", "all", "oft_only"]


@dataclass
class OFTConfig(AdapterConfig):
    """OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"): W R^T, i.e. the input is
    rotated by a trained block-diagonal orthogonal matrix R before the frozen layer (see peftlab/methods/oft/layer.py).
    Give exactly one of r (number of blocks) and oft_block_size (block side); r x oft_block_size = in_features."""

    peft_type: ClassVar[str] = "OFT"

    r: int = 0
    """Number of orthogonal blocks per layer (0: derived from oft_block_size). A size that does not divide
    in_features is moved to the nearest divisor, with a warning (PEFT's rule)."""

    oft_block_size: int = 32
    """Side of each orthogonal block (0: derived from r); each block trains b(b-1)/2 numbers (a skew-symmetric
    matrix). A size that does not divide in_features is moved to the nearest divisor, with a warning (PEFT's rule)."""

    module_dropout: float = 0.0
    """Training only: multiplicative dropout, replacing a random int(p x blocks) of the layer's blocks by the
    identity for one forward pass (the OFT paper's dropout; PEFT 0.21 builds this layer but never calls it)."""

    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as (in, out), as transformers' Conv1D (GPT-2) does; set
    automatically for Conv1D layers."""

    bias: str = "none"
    """Which biases train and are saved with the adapter: "none", "all" (every bias in the model) or "oft_only"
    (biases of the adapted layers)."""

    init_weights: bool = True
    """True: the skew-symmetric parameters start at 0, so R = I and the adapter starts as identity; False: normal
    with std 0.1 (not identity; for tests). PEFT's values."""

    coft: bool = False
    """Constrained OFT (COFT): before each use, the parameters of each block are scaled back so that the block's
    skew-symmetric matrix has Frobenius norm at most eps / sqrt(number of blocks) (in place, as PEFT does)."""

    eps: float = 6e-5
    """COFT's radius (the freedom of rotation); used only with coft."""

    block_share: bool = False
    """One block's parameters for every block of the layer (one rotation repeated along the diagonal)."""

    use_cayley_neumann: bool = True
    """R from the Cayley map by a truncated Neumann series (a few matmuls, no solve; nearly orthogonal for small
    parameters) instead of the exact (I - S)(I + S)^-1. PEFT 0.21's default."""

    num_cayley_neumann_terms: int = 5
    """Terms of the Neumann series (PEFT's): R = I + 2S + 2S² + ... + 2S^(n-2) + S^(n-1) for n >= 4."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_number(name, "r", self.r, low=0, integer=True)
        check_number(name, "oft_block_size", self.oft_block_size, low=0, integer=True)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"{name} has r={self.r} and oft_block_size={self.oft_block_size}; give exactly one of them (the other "
                "0), since r x oft_block_size = in_features. E.g. OFTConfig(oft_block_size=32) or OFTConfig(r=8, "
                "oft_block_size=0).")
        check_number(name, "module_dropout", self.module_dropout, low=0, high=1, high_inclusive=False)
        check_choice(name, "bias", self.bias, BIAS_MODES)
        for flag in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            check_choice(name, flag, getattr(self, flag), [True, False])
        check_number(name, "eps", self.eps, low=0)
        check_number(name, "num_cayley_neumann_terms", self.num_cayley_neumann_terms, low=1, integer=True)
