"""SelectiveConfig: which weight entries are candidates, how many are kept, and how the prepare phase scores them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig, ConfigError, check_choice, check_number

SCOPES = ("global", "per_tensor")


@dataclass
class SelectiveConfig(AdapterConfig):
    """Importance-selected sparse fine-tuning (FISH mask, Sung et al. 2021): the entries of the targeted linear
    weights with the largest Fisher information train, as a sparse delta beside the frozen weight; everything else
    stays frozen. See peftlab/methods/selective/__init__.py."""

    peft_type: ClassVar[str] = "SELECTIVE"
    # Steering only the selection run (the file's indices say what was selected): left out of adapter_config.json.
    file_omits: ClassVar[tuple[str, ...]] = ("num_samples", "rounds", "round_steps")

    target_modules: list[str] | str | None = "all-linear"
    """Modules whose weights are candidates (every entry of each targeted nn.Linear / Conv1D weight; biases, norms
    and embeddings are not). Same matching rules as for adapters; default every linear layer except the output head.
    layers_to_transform narrows it to some blocks (e.g. the top 10, so that backward stops there)."""

    density: float = 0.005
    """Fraction of the candidate entries kept (0 < density <= 1): the top `density` by Fisher score, over all
    candidates at once (scope "global") or within each tensor ("per_tensor"). Also the fraction of each tensor's
    entries selected at random before any scoring (see the method's docstring)."""

    threshold: float | None = None
    """When set, keep every entry whose Fisher score (mean squared gradient of the loss, per example) is >= this,
    instead of a `density` fraction; scope then does not matter. Scores scale with the loss: read the printed table's
    quantiles of one run before choosing."""

    scope: str = "global"
    """"global": one ranking over every candidate entry (the FISH mask), so important tensors get more entries;
    "per_tensor": each tensor keeps its own top `density` fraction."""

    num_samples: int = 64
    """Training rows scored per round (the paper's N; it used 1,024), one example per backward pass so that the
    score is the per-example squared gradient the empirical Fisher averages."""

    rounds: int = 1
    """Score -> select -> train cycles. Rounds 1 .. rounds-1 each train `round_steps` steps on the selection before
    scoring again at the new weights; the last selection trains in the main run."""

    round_steps: int | None = None
    """Optimizer steps of each intermediate round (required when rounds > 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_number(name, "density", self.density, low=0, high=1, low_inclusive=False)
        if self.threshold is not None:
            check_number(name, "threshold", self.threshold, low=0)
        check_choice(name, "scope", self.scope, SCOPES)
        check_number(name, "num_samples", self.num_samples, low=1, integer=True)
        check_number(name, "rounds", self.rounds, low=1, integer=True)
        if self.round_steps is not None:
            check_number(name, "round_steps", self.round_steps, low=1, integer=True)
        if self.rounds > 1 and self.round_steps is None:
            raise ConfigError(f"{name}.rounds={self.rounds} trains between selections, but round_steps is not set: "
                              "say how many optimizer steps each intermediate round takes, e.g. round_steps=20.")
