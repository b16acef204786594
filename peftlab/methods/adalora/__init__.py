"""AdaLoRA: LoRA in SVD form whose rank budget is allocated by importance during training.

Training needs no extra calls: the method's `on_step` hook runs the rank allocation after every optimizer step
(importance from that step's gradients, pruning to the cubic budget schedule, the final `rank_pattern` recorded
in the adapter's config at step total_step - tfinal) and its `extra_loss` hook adds the orthogonality
regulariser; `peftlab train` and any loop that calls `model.extra_loss()` and `model.on_step(step)` drive it (PEFT's
`update_and_allocate` is what users call by hand there). `total_step` must be the run's number of optimizer steps.

Files are PEFT's: `<path>.lora_A`, `<path>.lora_B`, `<path>.lora_E` (no `ranknum`: it is always init_r), with
only the kept triplets of each module once a rank_pattern exists, and the rank_pattern in adapter_config.json.
See layer.py (forward and merge) and allocator.py (importance, budget, regulariser) for the equations.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from ...io.adapter_files import KEY_PREFIX, AdapterFileError
from .allocator import adapter_layers, orthogonal_regularizer, update_and_allocate
from .config import AdaLoraConfig
from .layer import TRIPLET, SVDConv2d, SVDLinear, kept_triplets

# PEFT's AdaLoRA defaults (TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING): LoRA's query/value pairs, except
# these architectures, where PEFT adapts every projection of the block.
ADALORA_TARGETS = {
    **ATTENTION_QV_TARGETS,
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}


def _keep_only_kept_triplets(model, adapter_name: str, tensors: dict) -> dict:
    """`to_file`: with a rank_pattern, each module's P, E, Q lose the pruned triplets (PEFT's
    resize_state_dict_by_rank_pattern: rows of lora_A and lora_E, columns of lora_B), so that PEFT, which builds the
    adapter with the kept triplets only when it reads the pattern, can load the file."""
    config = model.peft_config[adapter_name]
    if not config.rank_pattern:
        return tensors
    out = dict(tensors)
    for path, _ in adapter_layers(model, adapter_name):
        keep = kept_triplets(config.rank_pattern, path, adapter_name)
        if keep is None:
            continue
        rank, mask = sum(keep), torch.tensor(keep)
        for t in TRIPLET:
            key = f"{KEY_PREFIX}{path}.{t}"
            dim = 1 if t == "lora_B" else 0  # lora_B is (out, r); lora_A (r, in) and lora_E (r, 1)
            tensor = out[key]
            if tensor.shape[dim] == rank:  # already the kept triplets only (e.g. an adapter loaded from a file)
                continue
            if tensor.shape[dim] != len(keep):
                raise ValueError(
                    f"{path}: rank_pattern flags {len(keep)} triplets but the adapter holds {tensor.shape[dim]}; "
                    "the config's rank_pattern does not belong to this adapter. Set rank_pattern=None to save all "
                    "triplets."
                )
            out[key] = tensor[mask] if dim == 0 else tensor[:, mask]
    return out


def _check_pruned_file(model, adapter_name: str, found: dict) -> None:
    """`load_targets`: no extra tensors; but a file whose modules hold fewer triplets than an adapter built without
    a rank_pattern gets a clearer error than the generic shape check."""
    config = model.peft_config[adapter_name]
    for path, layer in adapter_layers(model, adapter_name):
        key = f"{KEY_PREFIX}{path}.lora_A"
        have = layer.lora_A[adapter_name].shape[0]
        if key in found and found[key].shape[0] != have and kept_triplets(config.rank_pattern, path,
                                                                          adapter_name) is None:
            raise AdapterFileError(
                f"The AdaLoRA file holds {found[key].shape[0]} triplets for {path} but the adapter here has {have} "
                "(init_r): the file was saved after rank allocation pruned triplets, and this adapter was built "
                "without that rank_pattern. Load the folder with PeftModel.from_pretrained / load_adapter, which "
                "read the pattern from its adapter_config.json. (Resuming AdaLoRA training from a checkpoint is "
                "not supported: the importance averages are not saved.)"
            )
    return None


def _warn_fresh_importance(model, adapter_name: str) -> None:
    """`after_load`: a loaded adapter that will train starts its importance averages from zero."""
    if not model.peft_config[adapter_name].inference_mode:
        warnings.warn(
            "AdaLoRA's importance averages (sensitivity and uncertainty EMAs) are not part of adapter files, so "
            "training this loaded adapter on starts them from zero: its rank allocation differs from an "
            "uninterrupted run's. Load with is_trainable=False for inference.", stacklevel=3)


METHOD = register(Method(
    name="adalora",
    config_cls=AdaLoraConfig,
    layers=((nn.Linear, SVDLinear), (Conv1D, SVDLinear), (nn.Conv2d, SVDConv2d)),
    summary="LoRA in SVD form P diag(E) Q with the rank budget allocated by importance during training (AdaLoRA)",
    default_targets=ADALORA_TARGETS,
    on_step=update_and_allocate,
    tuner_calls={"update_and_allocate": update_and_allocate},  # PEFT's hand-called form of on_step
    extra_loss=orthogonal_regularizer,
    to_file=_keep_only_kept_triplets,
    load_targets=_check_pruned_file,
    after_load=_warn_fresh_importance,
))

__all__ = ["AdaLoraConfig", "SVDLinear", "SVDConv2d", "METHOD"]
