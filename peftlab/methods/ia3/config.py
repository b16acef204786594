"""IA3's config, with HF PEFT's field names, defaults and file keys (`peft.IA3Config`) so files interchange."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ...core.config import AdapterConfig, ConfigError, check_choice


def suffix_regex(entries: list[str]) -> str:
    """The regular expression equivalent to PEFT's list rule for feedforward_modules (a name ending with an entry,
    no "." boundary): a name fully matches `.*(?:e1|e2)` exactly when it ends with e1 or e2."""
    return ".*(?:" + "|".join(re.escape(entry) for entry in entries) + ")"


@dataclass
class IA3Config(AdapterConfig):
    """(IA)³ (Liu et al., 2022): learned vectors that rescale activations. An attention-side target (keys, values)
    gets l ⊙ (W x + b) (one scale per output feature); a feedforward target (the MLP's second projection) gets
    W (l ⊙ x) + b (one scale per input feature). Vectors start at 1, so the adapter starts as identity."""

    peft_type: ClassVar[str] = "IA3"
    # HF PEFT's IA3Config has no layers_to_transform / layers_pattern: PEFT would warn about and ignore them in a
    # file, so our files leave them out (they are refused below, so they are always None here).
    file_omits: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern")

    feedforward_modules: list[str] | str | None = None
    """Targets whose INPUT is scaled (vector of in_features, applied before the matmul) instead of their output.
    Matched as HF PEFT matches them, so that files compute the same in both libraries: a list matches a module
    whose full name ends with an entry (plain suffix, no "." boundary), a string is a regular expression matched
    against the full name. A list must be a subset of a list target_modules (PEFT refuses anything else). None:
    the architecture's default (llama: ["down_proj"], gpt2: ["mlp.c_proj"], bert: ["output.dense"], t5: ["wo"];
    see peftlab/methods/ia3/__init__.py), restricted to the entries that are in a list target_modules."""

    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as (in, out), as transformers' Conv1D (GPT-2) does; set
    automatically for Conv1D layers. The layers read the layout from the module itself; this records it."""

    init_ia3_weights: bool = True
    """True: every vector starts at 1 (identity). False: standard-normal vectors (not identity; for tests),
    PEFT's values."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        check_choice(name, "fan_in_fan_out", self.fan_in_fan_out, [True, False])
        check_choice(name, "init_ia3_weights", self.init_ia3_weights, [True, False])
        if self.feedforward_modules is not None and not isinstance(self.feedforward_modules, (list, str)):
            raise ConfigError(f"{name}.feedforward_modules={self.feedforward_modules!r} is not valid; give a list "
                              "of module names (e.g. ['down_proj']), a regular expression string, or None.")
        if self.layers_to_transform is not None:
            raise ConfigError(
                f"{name}.layers_to_transform={self.layers_to_transform!r}: HF PEFT's IA3Config has no "
                "layers_to_transform, so a file carrying it would be read by PEFT as adapting every layer. Name the "
                r"layers in a regular expression instead, e.g. target_modules=r'.*\.layers\.(0|1)\.(self_attn\.(k|v)"
                r"_proj|mlp\.down_proj)' with feedforward_modules=r'.*\.mlp\.down_proj'.")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ConfigError(
                f"{name}.feedforward_modules={ff!r} is not a subset of target_modules={targets!r} (missing: "
                f"{sorted(set(ff) - set(targets))}). A feedforward module is a target whose input is scaled, so each "
                "entry must also be in target_modules (HF PEFT requires the same). Add it to target_modules or "
                "remove it from feedforward_modules.")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the config") -> "IA3Config":
        """As AdapterConfig.from_dict, and also reads files whose feedforward list is not a subset of target_modules,
        which HF PEFT writes for target_modules="all-linear" (the chosen full module names beside ["down_proj"]) and
        then cannot read itself. The list becomes its exact regex equivalent: the same modules are feedforward as
        PEFT's rule makes them when it builds the adapter."""
        ff, targets = data.get("feedforward_modules"), data.get("target_modules")
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            data = {**data, "feedforward_modules": suffix_regex(ff)}
        return super().from_dict(data, source)
