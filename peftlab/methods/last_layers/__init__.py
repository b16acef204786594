"""Last layers: the top `num_layers` transformer blocks and the output layer train, everything below stays frozen.

The classic "fine-tune the top of the network" baseline. The blocks and the head are modules_to_save copies (one
per adapter), so the base stays intact, disabling gives it back, and the file holds only the trained blocks. The
backward pass stops at the lowest trained block, so a step costs far less than full fine-tuning.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ...core.config import AdapterConfig, ConfigError
from ...core.method import Method, register
from ...core.targets import COMMON_LAYER_LISTS, block_lists
from ..head_only import head_path
from .config import LastLayersConfig


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
