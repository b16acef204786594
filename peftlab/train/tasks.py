"""The task modes: which model head to load, how to sum the loss over a batch, and what to report.

Losses are returned as (sum over trained units, number of units): tokens for language modelling, examples for
classification, pairs for the preference tasks. The loop divides by the count over the whole global batch (all
micro-batches and processes), so gradient accumulation and multi-process training give the same update as one big
batch would.

The loop calls `task.forward(model, peft_model, batch, run) -> TaskOutput` for every batch, in training and
evaluation. Most tasks are a function of one forward's logits (`loss_sum(logits, batch)`); a task that needs more
(reward: the head's output at the last real token; dpo: a second forward with the adapters disabled) gives
`compute` instead (see preference.py). The next-token tasks (causal_lm, sft) compute their loss from the last hidden
states in chunks when train.chunked_loss allows it (lm_loss.py), and then return no logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.config import TaskType
from .lm_loss import chunked_lm_loss_sum, chunked_loss_plan, lm_targets
from .preference import dpo_forward, pair_sums, reward_forward


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes (labels stay out: the loss is ours, summed)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def lm_loss_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over tokens whose label is not -100.
    Packed rows: a token at position 0 starts a new example and is never a target (as in an unpacked row,
    whose first token has no predecessor), so the last token of one example never learns to predict the next."""
    # (B, extra + T): extra > 0 when prompt tuning / P-tuning put virtual tokens first (lm_loss.lm_targets). The
    # labels are shifted, not the logits: slicing logits[:, :-1] would copy the whole (B, T, V) tensor.
    targets = lm_targets(batch, logits.shape[1])
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


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0]) // 2  # pairs.py: B chosen rows, then B rejected rows


def classification_metrics(preds: list[int], labels: list[int], n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn's; a class never predicted nor present scores 0, zero_division=0): one
    implementation for the loop and the whole-run baselines (methods/baseline_run.py)."""
    from ..methods.baseline_run import classification_metrics as metrics

    return metrics(preds, labels, n_classes)


@dataclass(frozen=True)
class TaskOutput:
    """What a task computes on one batch."""

    loss_sum: torch.Tensor
    """The loss summed over the batch's units (0-d; carries gradients when grad is on)."""
    units: int
    """The number of units (tokens, examples, pairs) in the sum."""
    logits: torch.Tensor | None = None
    """The forward's logits, for tasks computed from one forward (classify reads its predictions here); None when
    the loss was computed without them (train.chunked_loss)."""
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-unit statistics summed over the batch (e.g. pairs ranked right); evaluation reports each / units."""


@dataclass(frozen=True)
class Task:
    name: str
    auto_model: str
    """transformers Auto class that loads the model with the right head."""
    task_type: TaskType
    loss_sum: Callable[[torch.Tensor, dict], tuple[torch.Tensor, int]] | None
    """(logits, batch) -> (summed loss, units), for a task computed from one forward's logits."""
    count_units: Callable[[dict], int]
    unit: str
    """What the loss averages over (shown in logs)."""
    classifies: bool = False
    compute: Callable[..., TaskOutput] | None = None
    """Instead of loss_sum: compute(model, peft_model, batch, run) -> TaskOutput, for a task that needs more than
    one forward's logits. `model` is what gradients flow through (the DDP wrapper in training, else the PeftModel);
    `peft_model` is the unwrapped PeftModel (to disable adapters, find the head); `run` the RunConfig. It runs under
    the caller's autocast and grad mode."""
    head_labels: tuple[str, ...] | None = None
    """The output head's labels when the task fixes them (reward: one score); classify takes its from the data."""
    reference_is_base: bool = False
    """The task compares against the base model with adapters disabled (dpo): adapters that change base weights in
    place (full, bitfit, bias != "none", Delta-LoRA) would move that reference, so the loop refuses them."""
    chunkable: bool = False
    """loss_sum is next-token cross-entropy over the lm_head's logits, so train.chunked_loss may compute it from the
    last hidden states in chunks, without the (tokens x vocab) logits (lm_loss.py)."""

    def forward(self, model, peft_model, batch: dict[str, torch.Tensor], run) -> TaskOutput:
        """The task's loss on one batch (see the module docstring)."""
        if self.compute is not None:
            return self.compute(model, peft_model, batch, run)
        if self.chunkable:
            mode = getattr(getattr(run, "train", None), "chunked_loss", "auto")
            plan = chunked_loss_plan(peft_model, mode, batch["input_ids"])
            if plan is not None:
                total, units = chunked_lm_loss_sum(model, peft_model, plan, model_inputs(batch), batch)
                return TaskOutput(total, units)
        logits = model(**model_inputs(batch)).logits
        total, units = self.loss_sum(logits, batch)
        return TaskOutput(total, units, logits)


def reward_compute(model, peft_model, batch: dict[str, torch.Tensor], run) -> TaskOutput:
    losses, chosen, rejected = reward_forward(model, peft_model, batch)
    return TaskOutput(losses.sum(), int(losses.numel()), sums=pair_sums(chosen, rejected))


def dpo_compute(model, peft_model, batch: dict[str, torch.Tensor], run) -> TaskOutput:
    losses, chosen, rejected = dpo_forward(model, peft_model, batch, run.preference)
    return TaskOutput(losses.sum(), int(losses.numel()), sums=pair_sums(chosen, rejected))


TASK_TABLE = {
    "causal_lm": Task("causal_lm", "AutoModelForCausalLM", TaskType.CAUSAL_LM, lm_loss_sum, count_lm_units, "token",
                      chunkable=True),
    "sft": Task("sft", "AutoModelForCausalLM", TaskType.CAUSAL_LM, lm_loss_sum, count_lm_units, "token",
                chunkable=True),
    "classify": Task("classify", "AutoModelForSequenceClassification", TaskType.SEQ_CLS, classify_loss_sum,
                     count_examples, "example", classifies=True),
    # One score per sequence from a one-output head (trained and saved with the adapter via modules_to_save).
    "reward": Task("reward", "AutoModelForSequenceClassification", TaskType.SEQ_CLS, None, count_pairs, "pair",
                   compute=reward_compute, head_labels=("reward",)),
    "dpo": Task("dpo", "AutoModelForCausalLM", TaskType.CAUSAL_LM, None, count_pairs, "pair", compute=dpo_compute,
                reference_is_base=True),
}


def summarise_eval(task: Task, loss_sum: float, units: int, preds: list[int], labels: list[int],
                   n_classes: int, sums: dict[str, float] | None = None) -> dict[str, float]:
    """Eval metrics: loss per unit; classify: accuracy and macro-F1; token tasks: perplexity; each of the task's
    summed statistics (`TaskOutput.sums`) per unit."""
    loss = loss_sum / max(units, 1)
    out = {"loss": loss}
    if task.classifies:
        out.update(classification_metrics(preds, labels, n_classes))
    elif task.unit == "token":
        out["perplexity"] = math.exp(min(loss, 50.0))
    for key, value in (sums or {}).items():
        out[key] = float(value) / max(units, 1)
    return out
