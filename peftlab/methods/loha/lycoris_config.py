"""`LycorisConfig`: the fields LoHa and LoKr share (PEFT's LycorisConfig plus the fields both its configs repeat), with
PEFT's names and defaults. Kept out of the methods' config.py files, each of which defines exactly one config class
(peftlab/methods/__init__.py's `config_class` reads them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...core.config import AdapterConfig, ConfigError, check_choice, check_number


@dataclass
class LycorisConfig(AdapterConfig):
    """The LyCORIS family's shared fields (LoHa, LoKr): rank, alpha, dropouts, per-module patterns."""

    r: int = 8
    """Rank of each low-rank factor (LoHa: both Hadamard factors; LoKr: the decomposed Kronecker factors)."""

    alpha: float = 8
    """Scale numerator: the update is multiplied by alpha / r."""

    rank_dropout: float = 0.0
    """Training only: the probability of zeroing each output row of the update (a fresh mask per forward; LoHa
    divides the kept rows by the kept fraction, LoKr only with rank_dropout_scale)."""

    module_dropout: float = 0.0
    """Training only: the probability of skipping this adapter's update on a layer for one forward pass."""

    use_effective_conv2d: bool = False
    """Conv2d targets with a kernel > 1x1: hold the kernel dimensions in a small core tensor (the CP/Tucker form of
    FedPara's "Proposition 3": hada_t1/hada_t2, lokr_t2) instead of flattening (in, kh, kw) into one axis."""

    init_weights: bool | str = True
    """True: the method's identity init (the update starts at exactly zero); False: every factor random (not
    identity; for tests), PEFT's values."""

    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overriding r: {name or regex matched at the end of the module name: rank}."""

    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overriding alpha, matched like rank_pattern."""

    init_choices: ClassVar[tuple] = (True, False)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_number(name, "r", self.r, low=1, integer=True)
        check_number(name, "alpha", self.alpha)
        check_number(name, "rank_dropout", self.rank_dropout, low=0, high=1, high_inclusive=False)
        check_number(name, "module_dropout", self.module_dropout, low=0, high=1, high_inclusive=False)
        check_choice(name, "use_effective_conv2d", self.use_effective_conv2d, [True, False])
        check_choice(name, "init_weights", self.init_weights, list(self.init_choices))
        for module, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ConfigError(f"{name}.rank_pattern[{module!r}]={rank!r} is not valid; ranks are integers >= 1.")
        for module, alpha in self.alpha_pattern.items():
            check_number(name, f"alpha_pattern[{module!r}]", alpha)


