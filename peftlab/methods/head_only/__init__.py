"""Output layer only (linear probing with a fine-tuned head): the model's output layer trains, nothing else.

The head is a modules_to_save copy (one per adapter), so disabling the adapter gives the original head back and the
file holds just the head: the classifier for SEQ_CLS (`score` / `classifier`, already added by the task), the
language-model head (`lm_head`) for causal LMs. A tied lm_head (SmolLM2 shares it with the input embedding) is
untied by the copy: only the output side trains.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ...core.config import AdapterConfig, ConfigError, TaskType
from ...core.method import Method, register
from ...core.model import TASK_HEADS
from ...core.targets import output_head_names
from .config import HeadOnlyConfig


def head_path(model: nn.Module, task_type) -> list[str]:
    """The module path(s) of the output layer for this task; [] when the task adds its own head (SEQ_CLS)."""
    if task_type in TASK_HEADS:
        return []  # the wrapped model puts the task head into modules_to_save itself
    names = sorted(output_head_names(model))
    if not names:  # no task_type given: a classifier head the model has under a usual name
        known = {h for heads in TASK_HEADS.values() for h in heads}
        names = [n for n, _ in model.named_children() if n in known]
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no output layer (get_output_embeddings() is None), so head_only has "
            "nothing to train. Load the model with a head (AutoModelForCausalLM, AutoModelForSequenceClassification) "
            "or name the module with modules_to_save=[...].")
    return names


def with_head(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    extra = [h for h in head_path(model, config.task_type) if h not in (config.modules_to_save or [])]
    if not extra:
        return config
    return dataclasses.replace(config, modules_to_save=list(config.modules_to_save or []) + extra)


METHOD = register(Method(
    name="head_only",
    config_cls=HeadOnlyConfig,
    layers=(),
    summary="Only the output layer trains (classifier or lm_head, as a saved copy)",
    complete_config=with_head,
))

__all__ = ["HeadOnlyConfig", "METHOD", "TaskType"]
