"""LoRA's config, with HF PEFT's field names and defaults so `adapter_config.json` files interchange."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...core.config import AdapterConfig, ConfigError, check_choice, check_number

BIAS_MODES = ["none", "all", "lora_only"]


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al., 2021): W x + (alpha / r) B A x, with A (r, in) and B (out, r) trained, W frozen."""

    peft_type: ClassVar[str] = "LORA"
    # PEFT writes these with their defaults; at these values they change nothing.
    peft_inert_keys: ClassVar[dict[str, Any]] = {"qalora_group_size": 16}

    r: int = 8
    """Rank of the update B A (A is r x in, B is out x r)."""

    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA)."""

    lora_dropout: float = 0.0
    """Dropout probability on the adapter branch's input only; the base path never sees dropout."""

    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as (in, out), as transformers' Conv1D (GPT-2) does;
    set automatically for Conv1D layers."""

    bias: str = "none"
    """Which biases train and are saved with the adapter: "none", "all" (every bias in the model) or
    "lora_only" (biases of the adapted layers)."""

    use_rslora: bool = False
    """rsLoRA (Kalajdzievski, 2023): scale by lora_alpha / sqrt(r), which keeps the update's size
    stable as r grows."""

    init_lora_weights: bool | str = True
    """Initialisation. True: A Kaiming-uniform, B zero (the adapter starts as identity); "gaussian": A
    normal with std 1/r, B zero; False: A and B both random (not identity; for tests). "pissa" / "pissa_niter_<K>"
    (PiSSA: A, B from W's top-r singular triplets, by full or K-iteration randomised SVD) and "olora" (OLoRA: from
    W's QR) also replace the base weight by the residual W - s B A, so the output is unchanged at init but the
    base weights are not: see peftlab/methods/lora/init.py for what that means for saving and loading."""

    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overriding r: {name or regex matched at the end of the module name: rank}."""

    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overriding lora_alpha, matched like rank_pattern."""

    use_dora: bool = False
    """True: DoRA (PEFT's spelling): `LoraConfig(use_dora=True)` builds a DoraConfig, the `dora` method. Only
    LoraConfig and DoraConfig take it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.use_dora is not False and "claims_file" not in type(self).__dict__:
            raise ConfigError(f"{name}.use_dora={self.use_dora!r} is not valid: DoRA is LoraConfig(use_dora=True) "
                              f"(or DoraConfig), and {name} has no DoRA variant. Remove use_dora.")
        check_number(name, "r", self.r, low=1, integer=True)
        check_number(name, "lora_alpha", self.lora_alpha)
        check_number(name, "lora_dropout", self.lora_dropout, low=0, high=1, high_inclusive=False)
        check_choice(name, "bias", self.bias, BIAS_MODES)
        from .init import INITIALIZERS, init_choices, parse_init  # local: keeps the config importable alone

        try:
            key, _ = parse_init(self.init_lora_weights)
        except TypeError:
            key = None
        if key not in INITIALIZERS:
            shown = ", ".join(repr(c) for c in init_choices())
            raise ConfigError(f"{name}.init_lora_weights={self.init_lora_weights!r} is not valid; use one of: {shown} "
                              "(<number>: an integer, e.g. 'pissa_niter_4').")
        for module, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ConfigError(f"{name}.rank_pattern[{module!r}]={rank!r} is not valid; ranks are integers >= 1.")
        for module, alpha in self.alpha_pattern.items():  # checked like lora_alpha, not at the first forward
            check_number(name, f"alpha_pattern[{module!r}]", alpha)
