"""Non-finite guards shared by the supervised loop (loop.py) and PPO (ppo/): a step whose loss or gradients hold
NaN/inf stops the run before the optimizer applies it, and weights that overflowed are never written."""

from __future__ import annotations

import torch

from ..io import adapter_files
from .checkpoint import list_checkpoints


class TrainingDivergedError(RuntimeError):
    """The loss or the gradients became NaN/inf: the run stopped before that step changed any weight."""


def non_finite_step(loss: torch.Tensor, grad_norm, params, accelerator) -> str | None:
    """'the loss is X, the gradients Y' when the step's loss or gradients hold NaN/inf, else None; every process
    decides alike. `grad_norm`: what clipping returned (None without clipping: then the gradients of `params` are
    checked directly, one pass over the few trained tensors; under FSDP each process checks its shards)."""
    acc = accelerator
    if grad_norm is not None:
        grads_ok = torch.isfinite(torch.as_tensor(grad_norm, device=acc.device).float()).all()
    else:
        grads = [p.grad for p in params if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        grads_ok = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
    bad = (~(torch.isfinite(loss.detach()).all() & grads_ok.to(loss.device))).float()
    if acc.num_processes > 1:
        bad = acc.reduce(bad, "sum")
    if not bool(bad > 0):
        return None
    norm = f"{float(grad_norm):g}" if grad_norm is not None else ("finite" if bool(grads_ok) else "NaN/inf")
    return f"the loss is {float(loss.detach()):g}, the gradients {norm}"


def check_weights_finite(tensors: dict[str, torch.Tensor], step: int, cfg, checkpoint_root: str) -> None:
    """Before a checkpoint or an adapter is written: finite gradients times a huge learning rate still overflow the
    weights."""
    try:
        adapter_files.check_finite(tensors, "the trained weights")
    except adapter_files.AdapterFileError:
        raise diverged_error("the trained weights hold NaN/inf values", step, cfg, checkpoint_root) from None


def diverged_error(what: str, step: int, cfg, checkpoint_root: str) -> TrainingDivergedError:
    """The one-line error of a run stopped at `step`: what went non-finite, the likely cause (the learning rate)
    with a value to try, and the last checkpoint under `checkpoint_root` (all kept: none holds the bad step)."""
    hint = f"lower train.lr (now {cfg.lr:g}; e.g. train.lr={cfg.lr / 10:g})"
    if cfg.max_grad_norm is None:
        hint += " or set train.max_grad_norm=1.0"
    if cfg.precision == "fp16":
        hint += ", or use train.precision=bf16/fp32 (fp16 overflows)"
    found = list_checkpoints(checkpoint_root)
    kept = (f"the last good checkpoint is {found[-1]} (continue from it with --resume once the config is fixed)"
            if found else "no checkpoint was saved before it")
    return TrainingDivergedError(
        f"training diverged at step {step}: {what}. The likely cause is a learning rate too high: {hint}. "
        f"Nothing of step {step} or after was saved; {kept}.")


__all__ = ["TrainingDivergedError", "check_weights_finite", "diverged_error", "non_finite_step"]
