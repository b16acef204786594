"""The task modes: which model head to load, how to sum the loss over a batch, and what to report.

Losses are returned as (sum over trained units, number of units): tokens for language modelling, examples for
classification. The loop divides by the count over the whole global batch (all micro-batches and processes),
so gradient accumulation and multi-process training give the same update as one big batch would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.config import TaskType


def lm_loss_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over tokens whose label is not -100.
    Packed rows: a token at position 0 starts a new example and is never a target (as in an unpacked row,
    whose first token has no predecessor), so the last token of one example never learns to predict the next."""
    labels = batch["labels"]
    if "position_ids" in batch:
        labels = labels.masked_fill(batch["position_ids"] == 0, -100)
    # Shift the labels, not the logits: position t predicts labels[t + 1]. Slicing logits[:, :-1] would copy the
    # whole (B, T, V) tensor (e.g. 4 x 128 x 49152 fp32 = 100 MB per step); padding labels costs nothing.
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((targets != -100).sum())


def classify_loss_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    labels = batch["labels"]
    return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())


def count_lm_units(batch: dict[str, torch.Tensor]) -> int:
    labels = batch["labels"]
    if "position_ids" in batch:
        labels = labels.masked_fill(batch["position_ids"] == 0, -100)
    return int((labels[:, 1:] != -100).sum())


def count_examples(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["labels"].numel())


def classification_metrics(preds: list[int], labels: list[int], n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (F1 per class, averaged with equal weight; a class never predicted nor present
    scores 0, as scikit-learn's zero_division=0 does)."""
    p, y = torch.tensor(preds), torch.tensor(labels)
    f1s = []
    for c in range(n_classes):
        tp = int(((p == c) & (y == c)).sum())
        fp = int(((p == c) & (y != c)).sum())
        fn = int(((p != c) & (y == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": float((p == y).float().mean()) if len(y) else 0.0, "macro_f1": sum(f1s) / n_classes}


@dataclass(frozen=True)
class Task:
    name: str
    auto_model: str
    """transformers Auto class that loads the model with the right head."""
    task_type: TaskType
    loss_sum: Callable[[torch.Tensor, dict], tuple[torch.Tensor, int]]
    count_units: Callable[[dict], int]
    unit: str
    """What the loss averages over (shown in logs)."""
    classifies: bool = False


TASK_TABLE = {
    "causal_lm": Task("causal_lm", "AutoModelForCausalLM", TaskType.CAUSAL_LM, lm_loss_sum, count_lm_units, "token"),
    "sft": Task("sft", "AutoModelForCausalLM", TaskType.CAUSAL_LM, lm_loss_sum, count_lm_units, "token"),
    "classify": Task("classify", "AutoModelForSequenceClassification", TaskType.SEQ_CLS, classify_loss_sum,
                     count_examples, "example", classifies=True),
}


def summarise_eval(task: Task, loss_sum: float, units: int, preds: list[int], labels: list[int],
                   n_classes: int) -> dict[str, float]:
    loss = loss_sum / max(units, 1)
    out = {"loss": loss}
    if task.classifies:
        out.update(classification_metrics(preds, labels, n_classes))
    else:
        out["perplexity"] = math.exp(min(loss, 50.0))
    return out
