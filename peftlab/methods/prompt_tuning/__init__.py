"""Prompt tuning (Lester et al. 2021): trainable virtual-token embeddings before the input, model frozen.

    inputs_embeds' = [P ; E(input_ids)],   P: (num_virtual_tokens, hidden), the only trained tensor

The shared virtual-token machinery (forward, generate, files) is in virtual_tokens.py, used by prefix_tuning and
p_tuning too.
"""

from __future__ import annotations

from torch import nn

from ...core.method import Method, register
from . import virtual_tokens as vt
from .config import PromptTuningConfig


def _random(model, config, total):
    return None  # nn.Embedding's own N(0, 1) init


def _text(model, config, total):
    return vt.text_rows(model, config.prompt_tuning_init_text, config.tokenizer_name_or_path, config.tokenizer_kwargs,
                        total)


def _sample_vocab(model, config, total):
    return vt.vocab_rows(model, total)


INIT = {"RANDOM": _random, "TEXT": _text, "SAMPLE_VOCAB": _sample_vocab}


def prompt_table(peft_model, adapter_name: str, config: PromptTuningConfig) -> dict:
    """The (T x num_transformer_submodules, D) table. Loaded for inference (inference_mode) it is not initialised,
    as in PEFT: the file's values replace it (so no tokenizer is loaded)."""
    model = peft_model.get_base_model()
    total = config.num_virtual_tokens * config.num_transformer_submodules
    table = vt.PromptTable(total, config.token_dim)  # N(0, 1) first, then the init, as PEFT draws them (same seed:
    rows = None if config.inference_mode else INIT[config.prompt_tuning_init](model, config, total)  # same rows)
    if rows is not None:
        table.embedding.weight = nn.Parameter(rows)
    return {vt.STORE: table.to(vt.embedding_device(model))}


METHOD = register(Method(
    name="prompt_tuning",
    config_cls=PromptTuningConfig,
    summary="Prompt tuning: num_virtual_tokens trainable input embeddings before every input (model frozen)",
    model_modules=prompt_table,
    **vt.METHOD_HOOKS,
))

__all__ = ["METHOD", "PromptTuningConfig"]
