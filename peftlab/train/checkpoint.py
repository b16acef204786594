"""Resumable training checkpoints, written atomically.

A checkpoint is a folder `checkpoints/step-000123/` holding:
- `adapter/`: the adapter in PEFT layout (also usable on its own);
- `state.pt`: optimizer, scheduler, step, early-stopping state and RNG states. Read back with
  `torch.load(weights_only=True)`, which unpickles only tensors and plain containers, never code.
The folder is built under a temporary name and swapped into place whole (io/atomic.py's atomic_folder), and old
ones are renamed away before they are deleted, so a crash never leaves a checkpoint that `--resume` would pick up
half-written or half-deleted.
"""

from __future__ import annotations

import os
import random
import re

import torch

from ..data.templates import save_adapter_template
from ..io import adapter_files
from ..io.atomic import TEMP_MARK, atomic_folder, atomic_write_with, recover_folder, remove_folder

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str, step: int, peft_model, state: dict, keep: int, chat_template: str | None = None
                    ) -> str:
    """root/step-NNNNNN/ with adapter/ (+ the run's chat template, data.chat_template, so that a checkpoint's adapter
    generates as the final one does) and state.pt, written as one folder; only the newest `keep` are kept."""
    folder = os.path.join(root, f"step-{step:06d}")
    with atomic_folder(folder) as staging:  # the same step saved twice (a rerun) is replaced whole
        peft_model.save_pretrained(os.path.join(staging, "adapter"))
        save_adapter_template(os.path.join(staging, "adapter"), chat_template)
        atomic_write_with(os.path.join(staging, "state.pt"), lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(root)[:-keep]:
        remove_folder(old)
    return folder


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint folders, oldest first (temporary folders are ignored)."""
    if not os.path.isdir(root):
        return []
    for name in os.listdir(root):  # a checkpoint swap killed between its two renames: put the old one back
        if name.startswith(".step-") and TEMP_MARK in name:
            recover_folder(os.path.join(root, name[1:].split(TEMP_MARK)[0]))
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := STEP_DIR.match(name)))
    return [os.path.join(root, name) for _, name in steps]


def load_checkpoint(folder: str, peft_model, adapter_name: str = "default") -> dict:
    """Load adapter weights into `peft_model` and return the training state. Through the model's own loader, so
    that what a method keeps beside its adapter tensors (Delta-LoRA's updated base weights) comes back too."""
    sub = os.path.join(folder, "adapter")
    sub = sub if adapter_name == "default" else os.path.join(sub, adapter_name)
    peft_model.load_tensors(adapter_name, adapter_files.read_weights(sub), sub)
    return torch.load(os.path.join(folder, "state.pt"), weights_only=True)
