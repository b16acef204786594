"""AdaLoRA's config, with HF PEFT's field names, defaults and checks (`peft.AdaLoraConfig`), so that
`adapter_config.json` files interchange.

PEFT's AdaLoraConfig subclasses its LoraConfig; this one does not subclass peftlab's LoraConfig because two LoRA
fields mean something else here: `r` is unused (the starting rank is `init_r`) and `rank_pattern` holds, per
module, which of the init_r triplets are kept ({"model.layers.0.self_attn.q_proj.lora_E": [true, false, ...]})
rather than an integer rank. LoRA keys PEFT writes at their "off" values (use_rslora=false, alpha_pattern={},
loftq_config={}, use_dora=false, ...) are accepted on reading, as for every config.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from ...core.config import AdapterConfig, ConfigError, check_choice, check_number

BIAS_MODES = ["none", "all", "lora_only"]


@dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA (Zhang et al., 2023): W x + P diag(E) Q x * lora_alpha / (ranknum + 1e-5), with P (out, r), E (r,),
    Q (r, in) trained and a rank budget that prunes the least important triplets during training. The schedule has
    three phases: `tinit` warm-up steps at the full budget, a cubic decrease to `target_r` per module until step
    total_step - tfinal, then `tfinal` steps of fine-tuning with the final ranks fixed. See layer.py and
    allocator.py for the equations."""

    peft_type: ClassVar[str] = "ADALORA"
    # PEFT writes these with their defaults; at these values they change nothing.
    peft_inert_keys: ClassVar[dict[str, Any]] = {"qalora_group_size": 16}

    target_r: int = 8
    """Target average rank per adapted module: the final budget is target_r x (number of adapted modules)
    triplets, spread over the modules by importance."""

    init_r: int = 12
    """Starting rank of every adapted module (P is out x init_r, E init_r x 1, Q init_r x in)."""

    tinit: int = 0
    """Warm-up steps at the full budget (no pruning) before the budget starts to fall."""

    tfinal: int = 0
    """Steps at the end of training with the final ranks fixed (pruned triplets stay zero)."""

    deltaT: int = 1
    """Prune to the current budget every deltaT steps while the budget falls."""

    beta1: float = 0.85
    """EMA factor of the sensitivity |w * dL/dw| (the smoothed importance I-bar), in (0, 1)."""

    beta2: float = 0.85
    """EMA factor of the uncertainty |I - I-bar|, in (0, 1)."""

    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser on P and Q that is added to the training loss (>= 0)."""

    total_step: int | None = None
    """Total optimizer steps of the run (required, as in PEFT): the budget schedule ends at total_step - tfinal.
    With `peftlab train`, set method.total_step to the run's steps (train.max_steps, or epochs x steps per
    epoch)."""

    rank_pattern: dict[str, list[bool]] | None = None
    """Which triplets each module keeps: {"<module path>.lora_E": [true, false, ...]} (init_r flags each),
    written by the rank allocation during training (finally at step total_step - tfinal). Saving keeps only the
    kept triplets in the file, and an adapter built from a config with a rank_pattern (as when loading such a
    file) has only those, as in PEFT. Leave it unset for a new adapter."""

    r: int = 8
    """Not used by AdaLoRA (the starting rank is init_r); kept because PEFT writes it."""

    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / (ranknum + 1e-5), ranknum = init_r (PEFT's
    scaling; a lora_alpha <= 0 scales by the module's rank instead, as PEFT does)."""

    lora_dropout: float = 0.0
    """Dropout probability on the adapter branch's input only."""

    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as (in, out) (transformers' Conv1D); set automatically."""

    bias: str = "none"
    """Which biases train and are saved with the adapter: "none", "all" or "lora_only" (as in LoRA)."""

    init_lora_weights: bool = True
    """True: E zero (the adapter starts as identity), P and Q normal with std 0.02, as PEFT; False: P, E, Q all
    standard normal (not identity; for tests)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.total_step is None:
            raise ConfigError(
                f"{name}.total_step is not set. AdaLoRA's rank budget schedule runs over the whole training, so it "
                "needs the run's total number of optimizer steps (HF PEFT requires it too). Set total_step=N; with "
                "`peftlab train`, set method.total_step to the run's steps (train.max_steps, or epochs x steps "
                "per epoch)."
            )
        check_number(name, "total_step", self.total_step, low=1, integer=True)
        for field_name in ("init_r", "deltaT"):
            check_number(name, field_name, getattr(self, field_name), low=1, integer=True)
        for field_name in ("target_r", "tinit", "tfinal"):
            check_number(name, field_name, getattr(self, field_name), low=0, integer=True)
        for field_name in ("beta1", "beta2"):
            check_number(name, field_name, getattr(self, field_name), low=0, high=1, low_inclusive=False,
                         high_inclusive=False)
        check_number(name, "orth_reg_weight", self.orth_reg_weight, low=0)
        check_number(name, "lora_alpha", self.lora_alpha)
        check_number(name, "lora_dropout", self.lora_dropout, low=0, high=1, high_inclusive=False)
        check_choice(name, "bias", self.bias, BIAS_MODES)
        check_choice(name, "init_lora_weights", self.init_lora_weights, [True, False])
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"{name}: tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no steps "
                f"for the budget to fall (it falls from step tinit+1 to total_step - tfinal = "
                f"{self.total_step - self.tfinal}). Lower tinit or tfinal, or raise total_step."
            )
        if not self.inference_mode and self.target_r > self.init_r:
            raise ConfigError(
                f"{name}.target_r={self.target_r} is above init_r={self.init_r}; AdaLoRA only prunes, so the "
                f"target rank must be at most the starting rank. Lower target_r or raise init_r."
            )
        for key, keep in (self.rank_pattern or {}).items():
            if not isinstance(keep, list) or not all(isinstance(k, bool) for k in keep):
                raise ConfigError(
                    f"{name}.rank_pattern[{key!r}]={keep!r} is not valid; AdaLoRA's rank_pattern maps a module's "
                    "'<path>.lora_E' to one true/false flag per triplet (which ones are kept)."
                )
        if self.r != 8:  # 8: PEFT's default; PEFT warns the same way
            warnings.warn(f"{name}.r={self.r} is not used by AdaLoRA; the starting rank is init_r "
                          f"(={self.init_r}). Set init_r instead.", stacklevel=3)
