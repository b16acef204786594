"""Last layers: the top `num_layers` transformer blocks and the output layer train, everything below stays frozen.

The classic "fine-tune the top of the network" baseline. The blocks and the head are modules_to_save copies (one
per adapter), so the base stays intact, disabling gives it back, and the file holds only the trained blocks. The
backward pass stops at the lowest trained block, so a step costs far less than full fine-tuning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ...core.config import AdapterConfig, ConfigError, check_number
from ...core.method import Method, register
from ...core.targets import COMMON_LAYER_LISTS, block_lists
from ..head_only import head_path


@dataclass
class LastLayersConfig(AdapterConfig):
    """The last `num_layers` blocks of each block stack (T5: of the encoder and of the decoder) plus the output
    layer train, as saved copies (modules_to_save)."""

    peft_type: ClassVar[str] = "LAST_LAYERS"

    num_layers: int = 2
    """How many blocks, counted from the top of each stack, train."""

    train_head: bool = True
    """Also train the output layer (lm_head for causal LMs; a SEQ_CLS head always trains, it is new)."""

    blocks_name: str | None = None
    """Name of the module list(s) holding the blocks (e.g. "layers", "h", "block"). None: the common names."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(type(self).__name__, "num_layers", self.num_layers, low=1, integer=True)


def top_blocks(model: nn.Module, config: LastLayersConfig) -> AdapterConfig:
    stacks = block_lists(model, config.blocks_name)
    if not stacks:
        raise ConfigError(
            f"last_layers found no list of transformer blocks in {type(model).__name__} (looked for module lists "
            f"named {config.blocks_name or COMMON_LAYER_LISTS}). Name it with blocks_name='<name>'.")
    shortest = min(len(blocks) for _, blocks in stacks)
    if config.num_layers > shortest:
        raise ConfigError(
            f"LastLayersConfig.num_layers={config.num_layers} but {stacks[0][0]!r} has only {shortest} blocks; use "
            f"1..{shortest}, or method full to train everything.")
    chosen = [f"{name}.{i}" for name, blocks in stacks for i in range(len(blocks) - config.num_layers, len(blocks))]
    if config.train_head:
        chosen += head_path(model, config.task_type)
    extra = [c for c in chosen if c not in (config.modules_to_save or [])]
    return dataclasses.replace(config, modules_to_save=list(config.modules_to_save or []) + extra)


METHOD = register(Method(
    name="last_layers",
    config_cls=LastLayersConfig,
    layers=(),
    summary="The top num_layers transformer blocks and the output layer train (as saved copies)",
    complete_config=top_blocks,
))

__all__ = ["LastLayersConfig", "METHOD"]
