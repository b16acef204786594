"""Loading the base model with the head a task needs, plus its tokenizer."""

from __future__ import annotations

import torch
import transformers

from ..models import load_model, load_tokenizer


def load_tokenizer_and_model(name_or_path: str, auto_model: str, label_names: list[str] | None = None):
    """(tokenizer, model) for `name_or_path` ("smollm2", a folder or a hub id), weights in fp32.

    fp32 master weights: mixed precision comes from autocast in the loop, so optimizer updates are never
    rounded to 16 bits. Classification heads get `num_labels`/`id2label` from the label set and the pad
    token id, which decoder models use to find the last real token of each row."""
    tokenizer = load_tokenizer(name_or_path)
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": torch.float32}
    if label_names:
        # ignore_mismatched_sizes: a base that already has a head for another label set gets a fresh one
        # (trained and saved with the adapter through modules_to_save).
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)}, ignore_mismatched_sizes=True)
    model = load_model(name_or_path, auto_class=getattr(transformers, auto_model), **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model
