"""Loading the base model with the head a task needs, plus its tokenizer."""

from __future__ import annotations

import contextlib

import torch
import transformers

from ..models import load_model, load_tokenizer


def load_tokenizer_and_model(name_or_path: str, auto_model: str, label_names: list[str] | None = None,
                             announce_head: bool = True):
    """(tokenizer, model) for `name_or_path` ("smollm2", a folder or a hub id), weights in fp32.

    fp32 master weights: mixed precision comes from autocast in the loop, so optimizer updates are never
    rounded to 16 bits. Classification heads get `num_labels`/`id2label` from the label set and the pad
    token id, which decoder models use to find the last real token of each row. announce_head=False: no line about
    the new head (for loading a trained adapter that brings its own head)."""
    tokenizer = load_tokenizer(name_or_path)
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": torch.float32}
    if label_names:
        # ignore_mismatched_sizes: a base that already has a head for another label set gets a fresh one
        # (trained and saved with the adapter through modules_to_save).
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)}, ignore_mismatched_sizes=True)
    if label_names:
        # transformers reports the new head's weights as MISSING in a loud table; that is expected here (the
        # head is created, trained and saved with the adapter), so say it in one line instead.
        with _transformers_verbosity(transformers.logging.ERROR):
            model = load_model(name_or_path, auto_class=getattr(transformers, auto_model), **kwargs)
        if announce_head:
            print(f"peftlab: a new classification head for {len(label_names)} labels {label_names[:6]} is trained "
                  "and saved with the adapter (modules_to_save)")
    else:
        model = load_model(name_or_path, auto_class=getattr(transformers, auto_model), **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


@contextlib.contextmanager
def _transformers_verbosity(level: int):
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(level)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(before)
