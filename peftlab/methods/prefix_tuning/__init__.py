"""Prefix tuning (Li & Liang 2021): trainable key/value rows before every layer's own, model frozen.

    layer l:  K' = [Pk_l ; K],  V' = [Pv_l ; V]      Pk_l, Pv_l: (num_virtual_tokens, H_kv x d_head)

handed to the model as a pre-filled transformers DynamicCache (the model's KV-cache argument), as PEFT does; the real tokens'
positions start after the prefix. With prefix_projection the rows are MLP(E) during training; files hold the rows
(`prompt_embeddings`, (T, num_layers x 2 x token_dim), PEFT's layout), plus, for a trainable adapter, the MLP's weights
for resuming. See prompt_tuning/virtual_tokens.py for the shared machinery.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.method import Method, register
from ..prompt_tuning import virtual_tokens as vt
from .config import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    """prefix_projection=True: E (T, D_kv) -> MLP -> (T, L x 2 x D_kv). Parameter names are PEFT's."""

    def __init__(self, rows: int, token_dim: int, hidden: int, num_layers: int, zero: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, token_dim)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(),
                                       nn.Linear(hidden, num_layers * 2 * token_dim))
        if zero:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


def prefix_encoder(peft_model, adapter_name: str, config: PrefixTuningConfig) -> dict:
    """Trainable with prefix_projection: the MLP encoder. Otherwise (and loaded for inference, as in PEFT): a table
    of the rows themselves."""
    model = peft_model.get_base_model()
    T, width = config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
    zero = config.init_weights == "zero"
    if config.prefix_projection and not config.inference_mode:
        module = PrefixEncoder(T, config.token_dim, config.encoder_hidden_size, config.num_layers, zero)
    else:
        module = vt.PromptTable(T, width)
        if zero:
            nn.init.zeros_(module.embedding.weight)
    return {vt.STORE: module.to(vt.embedding_device(model))}


METHOD = register(Method(
    name="prefix_tuning",
    config_cls=PrefixTuningConfig,
    summary="Prefix tuning: trainable key/value prefixes in every attention layer (model frozen)",
    model_modules=prefix_encoder,
    **vt.METHOD_HOOKS,
))

__all__ = ["METHOD", "PrefixEncoder", "PrefixTuningConfig"]
