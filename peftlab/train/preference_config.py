"""The `preference:` section of a run config (task dpo), apart from the losses in preference.py so that a run config
is checked without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import ConfigError, check_choice, check_number, field_docs

# The loss types; preference.DPO_LOSSES maps each to its function (torch).
DPO_LOSS_TYPES = ("sigmoid", "ipo")

PREFERENCE_TASKS = ("dpo",)
"""Tasks that read the `preference:` section of a run config."""


@dataclass
class PreferenceConfig:
    """DPO options (the `preference:` section of a run config; task dpo)."""

    beta: float = 0.1
    """Strength of the pull towards the reference model: the implicit reward is beta x the log-ratio between policy
    and reference. Small beta (0.1) lets the policy move further from the reference; IPO's target gap is 1/(2 beta)."""

    loss_type: str = "sigmoid"
    """sigmoid (DPO: -log sigmoid(beta h)) or ipo ((h - 1/(2 beta))^2, Azar et al. 2023), h = the chosen-minus-rejected
    difference of policy-minus-reference log-probabilities."""

    label_smoothing: float = 0.0
    """sigmoid only: the assumed probability that a pair's preference is flipped (conservative DPO); 0 is plain DPO,
    must be below 0.5."""

    def __post_init__(self) -> None:
        check_number("preference", "beta", self.beta, low=0, low_inclusive=False)
        check_choice("preference", "loss_type", self.loss_type, DPO_LOSS_TYPES)
        check_number("preference", "label_smoothing", self.label_smoothing, low=0, high=0.5, high_inclusive=False)
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"preference.label_smoothing={self.label_smoothing} applies to loss_type sigmoid only; "
                              f"{self.loss_type} has no smoothed form. Set label_smoothing: 0 or loss_type: sigmoid.")

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        return field_docs(cls)
