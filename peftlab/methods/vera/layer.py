"""VeRA layers and the shared projections.

Math (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation"), for a linear layer W (out, in):

    y = W x + b ⊙ (B_l (d ⊙ (A_l x)))        A_l = A[:, :in]   (r, in)      B_l = B[:out, :]   (out, r)
                                             d = vera_lambda_d (r)          b = vera_lambda_b (out)

A (r, in_max) and B (out_max, r) are one pair of frozen random matrices for the whole model, sized to the
largest adapted layer (in_max, out_max over the adapter's targets); each layer uses their top-left slice.
Only d and b train: r + out numbers per layer. Both are drawn Kaiming-uniform from one CPU generator seeded
with `projection_prng_key`, A first then B, with bound sqrt(6 / fan_in) (fan_in: in_max for A, r for B),
exactly as HF PEFT draws them, so the same seed gives PEFT's A and B.

Merged form: ΔW = diag(b) B_l diag(d) A_l = (b[:, None] * B_l) @ (d[:, None] * A_l), shape (out, in)
(transposed to (in, out) for Conv1D's fan_in_fan_out layout).

Init (PEFT's): b = 0 and d = d_initial, so the adapter starts as identity; init_weights=False gives b = 1,
d ~ N(0, 1).

Where things live: A and B are the method's shared tensors (`Method.shared_tensors`), kept once by core at
`base_model.vera_A.<adapter>` / `base_model.vera_B.<adapter>` and saved as `base_model.vera_A` / `base_model.vera_B`
when save_projection is set (PEFT's keys). The vectors are per layer: `<layer>.vera_lambda_b.<adapter>` in the
model, `<layer>.vera_lambda_b` in the file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer, linear_shape
from .config import VeraConfig


def _adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    # fp32 vectors on a half-precision base, as PEFT keeps adapter weights by default: optimizer updates on
    # vectors of size r or out lose most of their bits in bf16.
    return torch.float32 if base_weight.dtype in (torch.float16, torch.bfloat16) else base_weight.dtype


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: U(-bound, bound) with bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1],
    drawn in fp32 on the CPU from `generator` (the draw order, A then B, is part of the result)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def vera_projections(model, adapter_name: str, config: VeraConfig, layers) -> dict[str, torch.Tensor]:
    """`Method.shared_tensors` for VeRA: A (r, in_max) and B (out_max, r), sized to the largest adapted layer."""
    vera_layers = [layer for _, layer in layers if isinstance(layer, VeraLinear)]
    in_max = max(layer.in_features for layer in vera_layers)
    out_max = max(layer.out_features for layer in vera_layers)
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    A = _kaiming_uniform((config.r, in_max), generator)
    B = _kaiming_uniform((out_max, config.r), generator)
    weight = vera_layers[0].base_layer.weight
    dtype = _adapter_dtype(weight)
    return {"vera_A": A.to(device=weight.device, dtype=dtype), "vera_B": B.to(device=weight.device, dtype=dtype)}


class VeraLinear(AdapterLayer):
    """VeRA on nn.Linear (weight (out, in)) or transformers' Conv1D (weight (in, out))."""

    adapter_containers = ("vera_lambda_b", "vera_lambda_d", "vera_dropout", "r")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}

    def add_adapter(self, adapter_name: str, config: VeraConfig, module_name: str) -> None:
        if self.fan_in_fan_out:
            # The file must say the weight is (in, out), as PEFT records it when it meets a Conv1D.
            config.fan_in_fan_out = True
        weight = self.base_layer.weight
        dtype, device = _adapter_dtype(weight), weight.device
        r = config.r
        self.r[adapter_name] = r
        self.vera_dropout[adapter_name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        if config.init_weights:
            b = torch.zeros(self.out_features, dtype=dtype, device=device)
            d = torch.full((r,), float(config.d_initial), dtype=dtype, device=device)
        else:
            b = torch.ones(self.out_features, dtype=dtype, device=device)
            d = torch.randn(r, dtype=dtype, device=device)
        self.vera_lambda_b[adapter_name] = nn.Parameter(b)
        self.vera_lambda_d[adapter_name] = nn.Parameter(d)

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {"vera_lambda_b": self.vera_lambda_b[adapter_name], "vera_lambda_d": self.vera_lambda_d[adapter_name]}

    def _sliced(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's top-left slices of the shared projections: A_l (r, in), B_l (out, r)."""
        A = self.shared_tensor("vera_A", adapter_name)
        B = self.shared_tensor("vera_B", adapter_name)
        if A.shape[1] < self.in_features or B.shape[0] < self.out_features or A.shape[0] != self.r[adapter_name]:
            raise ValueError(
                f"VeRA adapter {adapter_name!r}: the shared projections are A {tuple(A.shape)} and B {tuple(B.shape)}, "
                f"but this layer needs at least ({self.r[adapter_name]}, {self.in_features}) and "
                f"({self.out_features}, {self.r[adapter_name]}). They are sized when the adapter is added; add the "
                "adapter again (get_peft_model / add_adapter) rather than editing vera_A/vera_B.")
        return A[:, : self.in_features].to(dtype), B[: self.out_features, :].to(dtype)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        b, d = self.vera_lambda_b[adapter_name], self.vera_lambda_d[adapter_name]
        A, B = self._sliced(adapter_name, d.dtype)
        delta = (b[:, None] * B) @ (d[:, None] * A)  # (out, r) @ (r, in) -> (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
            A, B = self._sliced(name, d.dtype)
            h = self.vera_dropout[name](x.to(d.dtype))
            # PEFT's order of operations, so fp32 results agree bit for bit: b * (B_l (d * (A_l h))).
            result = result + (b * F.linear(d * F.linear(h, A), B)).to(result.dtype)
        return result
