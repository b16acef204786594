"""P-tuning (Liu et al. 2021): virtual tokens produced by a trainable prompt encoder, model frozen.

    P = MLP(E_v)   or   P = MLP(BiLSTM(E_v)),   E_v: (num_virtual_tokens, D) trainable inputs of the encoder
    inputs_embeds' = [P ; E(input_ids)]

Files hold P itself (`prompt_embeddings`, PEFT's layout); a trainable adapter's file also keeps the encoder's
weights (`prompt_encoder.embedding.weight`, `prompt_encoder.mlp_head.0.weight`, ...) so training resumes exactly.
Loaded for inference, the model holds only P, as PEFT does (see prompt_tuning/virtual_tokens.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.method import Method, register
from ..prompt_tuning import virtual_tokens as vt
from .config import PromptEncoderConfig


class PromptEncoder(nn.Module):
    """E_v (rows, D) -> P (rows, D). Parameter names are PEFT's (embedding, lstm_head, mlp_head)."""

    def __init__(self, rows: int, dim: int, hidden: int, kind: str, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim)
        self.lstm_head = None
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, rows, D): one example; every row of a batch is the same
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]  # (1, rows, 2h)
        return self.mlp_head(x)[0]  # (rows, D)


def prompt_encoder(peft_model, adapter_name: str, config: PromptEncoderConfig) -> dict:
    """Trainable: the encoder. Loaded for inference: a table for its saved output (PEFT's inference mode)."""
    model = peft_model.get_base_model()
    rows = config.num_virtual_tokens * config.num_transformer_submodules
    if config.inference_mode:
        module = vt.PromptTable(rows, config.token_dim)
    else:
        module = PromptEncoder(rows, config.token_dim, config.encoder_hidden_size,
                               config.encoder_reparameterization_type, config.encoder_num_layers,
                               config.encoder_dropout)
    return {vt.STORE: module.to(vt.embedding_device(model))}


METHOD = register(Method(
    name="p_tuning",
    config_cls=PromptEncoderConfig,
    summary="P-tuning: virtual input tokens produced by a trainable MLP/LSTM prompt encoder (model frozen)",
    model_modules=prompt_encoder,
    **vt.METHOD_HOOKS,
))

__all__ = ["METHOD", "PromptEncoder", "PromptEncoderConfig"]
