"""LoRA-drop's config: LoRA's fields plus how phase 1 samples the data and how layers are kept.

The four LoRA-drop fields only steer training (which layers get their own pair); the trained adapter is plain LoRA.
They are left out of adapter_config.json (`file_omits`), so the file is an ordinary LORA file that HF PEFT, vLLM and
peftlab (as `lora`) read; run configs (run_config.yaml) keep them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import ConfigError, check_number
from ..lora.config import LoraConfig, parse_init


@dataclass
class LoraDropConfig(LoraConfig):
    """LoRA-drop (Zhou et al. 2024): a short LoRA run on a sample of the data scores every adapted layer by its mean
    ||ΔW x||^2; the layers that make up `threshold` of the total (or the `top_n` first) keep their own A, B and the
    others share one pair per module name, for the main training. See peftlab/methods/lora_drop/__init__.py."""

    peft_type: ClassVar[str] = "LORA"
    file_omits: ClassVar[tuple[str, ...]] = ("sample_ratio", "sample_steps", "threshold", "top_n")

    sample_ratio: float = 0.1
    """Phase 1 (the importance run) trains one pass over this fraction of the training rows, drawn at random with the
    run's seed (stratified by label for classification), and scores the layers on the same rows. Raised to one
    global batch when smaller. The paper's alpha, 10% by default."""

    sample_steps: int | None = None
    """When set, phase 1 takes this many optimizer steps instead, over sample_steps x global batch rows (all rows,
    in several passes, when there are fewer); sample_ratio is then ignored."""

    threshold: float = 0.9
    """Keep the fewest layers whose normalised importances, taken in descending order, add up to at least this
    (0 < threshold <= 1; the paper's T, 0.9 by default). The other layers share."""

    top_n: int | None = None
    """When set, keep exactly the top_n most important layers (all of them when there are fewer) and ignore
    threshold."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_number(name, "sample_ratio", self.sample_ratio, low=0, high=1, low_inclusive=False)
        if self.sample_steps is not None:
            check_number(name, "sample_steps", self.sample_steps, low=1, integer=True)
        check_number(name, "threshold", self.threshold, low=0, high=1, low_inclusive=False)
        if self.top_n is not None:
            check_number(name, "top_n", self.top_n, low=1, integer=True)
        init = self.init_lora_weights
        if parse_init(init)[0] not in ("default", "gaussian", "random"):
            raise ConfigError(
                f"{name}.init_lora_weights={init!r} is not valid for LoRA-drop; use True, 'gaussian' or False. "
                f"{init!r} folds each layer's own factors out of its base weight (W_res = W - s B A), so one pair "
                "shared by several layers would no longer add up to their original weights.")
