"""Bottleneck adapters: h + up(act(down(h))) after sublayer output projections (see layer.py for the math)."""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from ...core.config import ConfigError
from ...core.method import Method, register
from ...core.targets import Conv1D, candidate_names
from .config import BottleneckConfig
from .layer import BottleneckLinear

# model_type -> placement -> (target_modules, exclude_modules): the sublayers' output projections. Lists match as
# core matches them (full name equal, or ending with "." + entry). BERT's MLP output is `layer.N.output.dense`, whose
# suffix "output.dense" also ends the attention block's `layer.N.attention.output.dense`: pfeiffer excludes that one.
_LLAMA_LIKE = {"houlsby": (["self_attn.o_proj", "mlp.down_proj"], []), "pfeiffer": (["mlp.down_proj"], [])}
_GPT2_LIKE = {"houlsby": (["attn.c_proj", "mlp.c_proj"], []), "pfeiffer": (["mlp.c_proj"], [])}
_BERT_LIKE = {"houlsby": (["attention.output.dense", "output.dense"], []),
              "pfeiffer": (["output.dense"], ["attention.output.dense"])}
# T5: "o" is the output of self-attention (and, in the decoder, cross-attention), "wo" the MLP's (gated or not).
_T5_LIKE = {"houlsby": (["SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"], []),
            "pfeiffer": (["DenseReluDense.wo"], [])}

PLACEMENTS: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"], _LLAMA_LIKE),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], _GPT2_LIKE),
    **dict.fromkeys(["bert", "roberta"], _BERT_LIKE),
    **dict.fromkeys(["t5", "mt5"], _T5_LIKE),
}


def complete_bottleneck_config(model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
    """`Method.complete_config`: with no target_modules, the placement's modules for this model type (written to the
    file, so loading adapts the same modules whatever the defaults become)."""
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLACEMENTS:
        leafs = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in candidate_names(model)))
        raise ConfigError(
            f"BottleneckConfig.target_modules is not set and bottleneck has no placement table for "
            f"model_type={model_type!r} (known: {', '.join(sorted(PLACEMENTS))}). Name the sublayers' output "
            f"projections yourself, e.g. target_modules=['o_proj', 'down_proj'] (houlsby) or ['down_proj'] (pfeiffer). "
            f"Linear-like modules present: {', '.join(leafs[:12]) or 'none'}.")
    targets, exclude = PLACEMENTS[model_type][config.placement]
    changes: dict = {"target_modules": list(targets)}
    if exclude:
        given = config.exclude_modules
        if given is None:
            changes["exclude_modules"] = list(exclude)
        elif isinstance(given, list):
            changes["exclude_modules"] = list(dict.fromkeys(given + exclude))
        else:  # a regular expression: add ours as alternatives matching the same names the list would
            ours = "|".join(rf"(?:.*\.)?{re.escape(e)}" for e in exclude)
            changes["exclude_modules"] = f"(?:{given})|{ours}"
    return dataclasses.replace(config, **changes)


METHOD = register(Method(
    name="bottleneck",
    config_cls=BottleneckConfig,
    layers=((nn.Linear, BottleneckLinear), (Conv1D, BottleneckLinear)),
    summary="Bottleneck adapters h + up(act(down(h))) after attention/MLP outputs (Houlsby/Pfeiffer); not mergeable",
    # The default placement's modules, for `peftlab inspect --method bottleneck`; injection reads PLACEMENTS through
    # complete_config, which also knows the placement and BERT's exclusion.
    default_targets={model_type: list(table["houlsby"][0]) for model_type, table in PLACEMENTS.items()},
    complete_config=complete_bottleneck_config,
    merges=False,
))

__all__ = ["BottleneckConfig", "BottleneckLinear", "PLACEMENTS", "METHOD"]
