"""Optimiser, schedule and precision helpers shared by every trainer (loop.py, ppo/, prepare.py's phase before
training): the run's Accelerator, AdamW parameter groups with weight decay only where it regularises, and the
learning-rate schedule as a LambdaLR factor."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from ..models.dtype import native_cpu


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed_precision value. auto: bf16 where it is fast (measured here: a LoRA step on
    SmolLM2 ran 1.6x faster under bf16 autocast than fp32 on a CPU with AVX512-BF16), else fp32."""
    if precision == "fp32":
        return "no"
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if native_cpu(torch.bfloat16) else "no"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of train.precision (auto resolved as above), None for fp32: for code that runs the model
    without an Accelerator (the methods that take over a run, Method.run)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision))


def new_accelerator(precision: str) -> Accelerator:
    """The run's Accelerator (mixed precision from `precision`; cpu=True without CUDA, so that under `accelerate
    launch --num_processes N` Accelerate sets up gloo across the N processes instead of each training alone).

    Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another mixed_precision
    ("AcceleratorState has already been initialized"): a notebook that ran transformers' Trainer (which makes one
    with precision "no") could then never run a bf16 peftlab run. A state left by an earlier Accelerator that asked
    for other precision is dropped first; the process group (PartialState) is kept, so launched runs are unchanged."""
    mixed = resolve_precision(precision)
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed:
        AcceleratorState._reset_state()  # accelerate's own reset (its tests use it); not the process group
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())


def param_groups_with_decay(peft_model, lr: float, weight_decay: float) -> list[dict]:
    """The methods' parameter groups (`peft_model`: a peftlab PeftModel), each split so that 1-D tensors (biases,
    norm weights, scaling vectors) get no weight decay: decaying them pulls scales towards 0, which is not
    regularisation. A group whose method set its own `weight_decay` keeps it (IA3's (1, d)-shaped scaling vectors
    must not decay towards 0 either)."""
    groups = []
    for group in peft_model.optimizer_param_groups(lr):
        params = group.pop("params")
        group_decay = group.pop("weight_decay", weight_decay)
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        if decay:
            groups.append({**group, "params": decay, "weight_decay": group_decay})
        if no_decay:
            groups.append({**group, "params": no_decay, "weight_decay": 0.0})
    return groups


def lr_lambda(schedule: str, warmup: int, total: int):
    """LambdaLR's factor at optimizer step `step`: (step + 1) / warmup during warmup, then over the remaining
    total - warmup steps linear (1 -> 0), cosine (0.5 (1 + cos(pi p)), 1 -> 0) or constant (1)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return factor


def adamw_with_schedule(groups: list[dict], cfg, total_steps: int):
    """(AdamW over `groups`, its LambdaLR) for the run's train config `cfg`: warmup_steps, else warmup_ratio of
    `total_steps`, then cfg.scheduler over the rest."""
    optimizer = torch.optim.AdamW(groups)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, warmup, total_steps))


__all__ = ["adamw_with_schedule", "autocast_dtype", "lr_lambda", "new_accelerator", "param_groups_with_decay",
           "resolve_precision"]
