"""Loading the base model with the head a task needs, plus its tokenizer."""

from __future__ import annotations

import torch
import transformers

from ..core.method import method_for_config
from ..core.model import PeftModel
from ..core.save_load import config_as_trained, read_config
from ..models import load_model, load_tokenizer, resolve_dtype
from ..models.dtype import to_stderr


def load_tokenizer_and_model(name_or_path: str, auto_model: str, label_names: list[str] | None = None,
                             announce_head: bool = True, dtype: str = "fp32", method_config=None):
    """(tokenizer, model) for `name_or_path` ("smollm2", a folder or a hub id), the frozen base in `dtype`
    (auto | bf16 | fp16 | fp32, peftlab.models.dtype; the run's first line says which and why).

    Trainable tensors become fp32 master weights when the adapter makes them trainable (peftlab.core.model), and the
    loop computes under autocast, so optimizer updates are never rounded to 16 bits. `method_config`: the run's
    adapter config; a method that holds base weights in low precision (Method.quantize_at_load: QLoRA) gets them
    built as they are read. Classification heads get `num_labels`/`id2label` from the label set and the pad
    token id, which decoder models use to find the last real token of each row. announce_head=False: no line about
    the new head (for loading a trained adapter that brings its own head)."""
    tokenizer = load_tokenizer(name_or_path)
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": dtype, "log": to_stderr}
    if method_config is not None:
        method = method_for_config(method_config)
        if method.quantize_at_load is not None:
            kwargs["quantize"] = method.quantize_at_load(method_config)
    if label_names:
        # ignore_mismatched_sizes: a base that already has a head for another label set gets a fresh one
        # (trained and saved with the adapter through modules_to_save).
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)}, ignore_mismatched_sizes=True)
    model = load_model(name_or_path, auto_class=getattr(transformers, auto_model), **kwargs)
    if label_names and announce_head:
        print(f"peftlab: a new classification head for {len(label_names)} labels {label_names[:6]} is trained "
              "and saved with the adapter (modules_to_save)")
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def load_trained_adapter(name_or_path: str, auto_model: str, label_names: list[str], adapter_dir: str,
                         dtype: str = "fp32", method_config=None):
    """(tokenizer, PeftModel): the adapter in `adapter_dir` on the base as its run trained it. The base in `dtype`
    (a run's base_dtype) and, where `method_config`'s method holds it quantised (qlora), quantised as it is read; the
    file loaded as that method (a qlora file reads as plain LoRA: core.save_load.config_as_trained). `label_names`
    size the task head, whose weights the adapter brings."""
    tokenizer, base = load_tokenizer_and_model(name_or_path, auto_model, label_names, announce_head=False,
                                               dtype=dtype, method_config=method_config)
    config = config_as_trained(read_config(adapter_dir), method_config)
    return tokenizer, PeftModel.from_pretrained(base, adapter_dir, config=config)


def autocast_for(dtype: str) -> torch.dtype | None:
    """The autocast dtype to compute in on a base loaded in `dtype` (a 16-bit base beside fp32 adapters, as training
    ran it); None for an fp32 base."""
    sixteen = resolve_dtype(dtype)[0]
    return sixteen if sixteen != torch.float32 else None
