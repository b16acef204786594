"""LoRA's config, with HF PEFT's field names and defaults so `adapter_config.json` files interchange."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...core.config import AdapterConfig, ConfigError, check_choice, check_number

BIAS_MODES = ["none", "all", "lora_only"]

# The schemes init_lora_weights names: the rows of init.INITIALIZERS (the functions, which need torch), listed here
# so that a config is checked without importing torch; tests/test_layers.py keeps the two equal.
INIT_SCHEMES = ("default", "gaussian", "random", "pissa", "pissa_niter", "olora", "loftq")

# Rows whose config value ends in "_<integer>" (PEFT's "pissa_niter_[number of iters]"): row -> the keyword the
# number is passed as.
NUMBERED = {"pissa_niter": "niter"}


def init_key(value: bool | str) -> str:
    """Map the config value (PEFT's: True, False or a name) to a scheme (a row of init.INITIALIZERS)."""
    return parse_init(value)[0]


def parse_init(value: bool | str) -> tuple[str, dict[str, int]]:
    """(scheme, keyword arguments for it) for a config value. The row may not exist: callers check
    it against INIT_SCHEMES (LoraConfig does, with `init_choices()` in its message)."""
    if value is True:
        return "default", {}
    if value is False:
        return "random", {}
    if isinstance(value, str):
        key = value.lower()
        numbered = re.fullmatch(r"(?P<row>.+)_(?P<number>\d+)", key)
        if numbered and numbered["row"] in NUMBERED:
            return numbered["row"], {NUMBERED[numbered["row"]]: int(numbered["number"])}
        if key in NUMBERED:
            return f"{key}_<number>", {}  # the number is missing: no such row, so the caller reports it
        return key, {}
    raise TypeError(f"init_lora_weights must be True, False or a name, not {value!r}")


def init_choices() -> list[bool | str]:
    """The values `init_lora_weights` accepts, as users write them."""
    return [True, False] + [f"{k}_<number>" if k in NUMBERED else k for k in INIT_SCHEMES]



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
    base weights are not: see peftlab/methods/lora/init.py for what that means for saving and loading. "loftq"
    (LoftQ, with loftq_config): the base becomes a 4-bit NF4 Q and A, B are fitted to W - Q, alternately (see
    peftlab/methods/lora/loftq.py); meant for QLoRA, where the 4-bit base is that Q."""

    loftq_config: dict[str, int] = field(default_factory=dict)
    """LoftQ's settings (PEFT's LoftQConfig, as a dict or a LoftQConfig): {"loftq_bits": 4, "loftq_iter": 1}, the
    bits of the quantised base (only 4, NF4) and the number of alternating quantise/SVD steps. Used only with
    init_lora_weights="loftq" (missing keys take those defaults); otherwise it is emptied, with a warning, as PEFT
    does."""

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
        try:
            key, _ = parse_init(self.init_lora_weights)
        except TypeError:
            key = None
        if key not in INIT_SCHEMES:
            shown = ", ".join(repr(c) for c in init_choices())
            raise ConfigError(f"{name}.init_lora_weights={self.init_lora_weights!r} is not valid; use one of: {shown} "
                              "(<number>: an integer, e.g. 'pissa_niter_4').")
        self._check_loftq(name, key)
        for module, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ConfigError(f"{name}.rank_pattern[{module!r}]={rank!r} is not valid; ranks are integers >= 1.")
        for module, alpha in self.alpha_pattern.items():  # checked like lora_alpha, not at the first forward
            check_number(name, f"alpha_pattern[{module!r}]", alpha)

    def _check_loftq(self, name: str, init: str | None) -> None:
        """loftq_config as PEFT keeps it: a dict, filled in for init_lora_weights="loftq", emptied otherwise."""
        given = self.loftq_config
        if not isinstance(given, dict):
            given = dict(vars(given)) if hasattr(given, "__dict__") else given  # PEFT's / our LoftQConfig object
        if not isinstance(given, dict):
            raise ConfigError(f"{name}.loftq_config={self.loftq_config!r} is not valid; give a dict such as "
                              "{'loftq_bits': 4, 'loftq_iter': 1}.")
        if init != "loftq":
            if given:
                warnings.warn(f"{name}.loftq_config is set but init_lora_weights={self.init_lora_weights!r} is not "
                              "'loftq'; it is ignored (emptied), as PEFT does.", UserWarning, stacklevel=4)
            self.loftq_config = {}
            return
        unknown = sorted(set(given) - set(LOFTQ_DEFAULTS))
        if unknown:
            raise ConfigError(f"{name}.loftq_config has unknown keys {unknown}; LoftQ takes "
                              f"{sorted(LOFTQ_DEFAULTS)} (PEFT's LoftQConfig).")
        self.loftq_config = {**LOFTQ_DEFAULTS, **given}
        if self.loftq_config["loftq_bits"] != 4:
            raise ConfigError(f"{name}.loftq_config['loftq_bits']={self.loftq_config['loftq_bits']!r} is not "
                              "implemented; peftlab's LoftQ quantises to 4-bit NF4 (QLoRA's format). Use 4.")
        check_number(name, "loftq_config['loftq_iter']", self.loftq_config["loftq_iter"], low=1, integer=True)


# PEFT's LoftQConfig defaults.
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}


@dataclass
class LoftQConfig:
    """PEFT's LoftQConfig (peft.LoftQConfig): `LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig())`
    stores it as a dict."""

    loftq_bits: int = 4
    """Bits of the quantised base: 4 (NF4) is the one implemented."""

    loftq_iter: int = 1
    """Alternating quantise / SVD steps."""
