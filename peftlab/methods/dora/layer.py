"""DoRA layers: LoRA's update split into a direction and a trained magnitude (Liu et al., 2024).

Linear (W (out, in), bias b, A (r, in), B (out, r), s = alpha / r or alpha / sqrt(r), m (out,)):

    V = W + s B A                                   (out, in)   the LoRA-updated weight
    n = ||V||_row = sqrt(sum_j V_ij^2)              (out,)      one norm per output unit (PEFT's
                                                                `torch.linalg.norm(W + s B A, dim=1)`)
    y = (m / n) * (V x) + b                         (..., out)

m starts as ||W||_row, so m / n = 1 exactly while B = 0 and the wrapped layer is the base layer, bit for bit.
n is treated as a constant in backward (computed under no_grad, the paper's section 4.3 and what PEFT does): the
gradients reach m through m / n and A, B only through the B A x term.

V is never applied to x. The forward reuses the base layer's own output (as PEFT does):

    base = base_layer(x) - b = W x
    y = base_layer(x) + [(m/n - 1) * base + (m/n) * s B(A(x))]

which needs W + s B A only for the norm: one (out, in) temporary per adapter per forward, without autograd.
With dropout active (training, lora_dropout > 0) PEFT applies the dropout to the adapter's input x_d = drop(x) and
recomputes the base part on it, so that the rescaling acts on the same input as the update:

    y = base_layer(x) + [(m/n - 1) * W x_d + (m/n) * s B(A(x_d))]

(one extra x_d @ W^T per adapter; kept for parity with PEFT). With several DoRA adapters active, each one rescales
everything before it, `result` included, exactly as PEFT's loop does; each n is taken of the base weight with its
own update only.

Layouts (the norm is always over the input side, one value per output unit):
- transformers' Conv1D (GPT-2) stores W as (in, out): the same with W^T, m (out,).
- Embedding (W (vocab, dim), A (r, vocab), B (dim, r), no dropout): V^T = W^T + s B A (dim, vocab), n over the
  vocabulary, m (dim,); y = (m/n) * (W[t] + s B A[:, t]) = (m/n) * base + (m/n) * s B A[:, t].
- Conv2d (W (out, in, kh, kw), A a conv into r channels, B (out, r, 1, 1)): n over (in, kh, kw), m and n stored
  (1, out, 1, 1) as PEFT stores them, broadcasting over (N, out, H, W).

Fast path: `peftlab.kernels.enable(model)` sets `kernel_backend` on DoraLinear as on LoraLinear; then, where it is
exactly this forward (one live adapter, none merged, no dropout at work, a plain nn.Linear base, no extra forward
arguments), DoraLinear runs `peftlab.kernels.fused_dora_linear`: y = (m / n) * (x W^T + s (x A^T) B^T) + b as one
autograd node, with n from ||W||^2, W A^T and A A^T instead of the (out, in) W + s B A (kernels/dora_linear.py).
Everywhere else, and with the switch off, the plain forward below runs, unchanged.

Merging writes W' = (m / n) * (W + s B A) (the factor applied per output unit), with n computed from the unmerged
base weight as forward computes it; unmerging inverts it, W = W' / (m / n) - s B A, with the n used at merge time
kept (a vector of `out` floats per merged adapter, PEFT caches the same) because W' no longer gives it back.

Parameter names are PEFT's: `lora_A.<adapter>.weight`, `lora_B.<adapter>.weight` and
`lora_magnitude_vector.<adapter>.weight` in the model, `...lora_magnitude_vector` (no `.weight`) in the file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.dora_linear import fused_dora_linear
from ..lora.fused import fused_adapter
from ..lora.layer import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear, adapter_input


class Magnitude(nn.Module):
    """One adapter's magnitude m, as PEFT's DoraLinearLayer holds it (a module with `.weight`), so that
    in-model parameter names read `lora_magnitude_vector.<adapter>.weight` as in PEFT."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class DoraLayer(LoraLayer):
    """What every DoRA wrapper adds to its LoRA wrapper: the magnitudes, the norm, and the non-additive merge.

    A subclass says how its weight is laid out: `_rows(W)` views the base weight (or an update in its layout) as
    the (out, in...) matrix whose rows are normed, `_factor_view(f)` shapes a per-output factor to multiply the base
    weight, and `_update_rows(name)` is s B A in `_rows` layout.
    """

    magnitude_name = "lora_magnitude_vector"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ModuleDict()
        self.merge_norms: dict[str, torch.Tensor] = {}  # adapter -> n used when it was merged (unmerge needs it)

    # ---- layout, per layer kind ----------------------------------------------------------------------

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def _update_rows(self, name: str) -> torch.Tensor:
        A, B = self.lora_pair(name)
        return B @ A  # (out, in)

    def _norm_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(rows, dim=1)  # (out,)

    def _factor_view(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.reshape(-1, 1)

    # ---- the norm and the magnitude ------------------------------------------------------------------

    def _weight_without_merges(self) -> torch.Tensor:
        """The base weight without the adapters merged into it (the weight itself when none is)."""
        weight = self.base_weight().detach()
        if not self.merged_adapters:
            return weight
        restored = weight.to(torch.float32)
        for name in reversed(self.merged_adapters):
            restored = restored / self._merge_factor(name) - self.delta_weight(name).to(torch.float32)
        return restored

    @torch.no_grad()
    def weight_norm(self, name: str) -> torch.Tensor:
        """n = ||W + s B A|| per output unit, shaped like the magnitude; a constant for autograd (DoRA sec. 4.3)."""
        update = self._update_rows(name)
        rows = self._rows(self._weight_without_merges()).to(update.dtype)
        return self._norm_of_rows(rows + self.scaling[name] * update)

    def magnitude(self, name: str) -> nn.Parameter:
        return self.lora_magnitude_vector[name].weight

    def add_adapter(self, adapter_name: str, config, module_name: str) -> None:
        super().add_adapter(adapter_name, config, module_name)  # A, B (and PiSSA/OLoRA's residual base) first
        # m = ||W + s B A||: the same expression forward divides by, so m / n is exactly 1 while A, B are untouched.
        self.lora_magnitude_vector[adapter_name] = Magnitude(self.weight_norm(adapter_name).clone())

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        tensors = super().adapter_tensors(adapter_name)
        tensors[self.magnitude_name] = self.magnitude(adapter_name)  # PEFT's file key has no ".weight"
        return tensors

    def scale(self, name: str) -> torch.Tensor:
        """m / n, the per-output rescaling of adapter `name` (gradient flows into m only)."""
        return self.magnitude(name) / self.weight_norm(name)

    # ---- merging: W' = (m / n) (W + s B A), not W + delta ---------------------------------------------

    def _merge_factor(self, name: str) -> torch.Tensor:
        m = self.magnitude(name).detach().to(torch.float32)
        return self._factor_view(m / self.merge_norms[name].to(torch.float32))

    merge_label = "DoRA "
    merge_hint = "Check the adapter weights (and that no norm ||W + s B A|| is zero) for NaN/inf."

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W' = (m / n) (W + s B A), with n = ||W + s B A|| of the unmerged weight as forward computes it; n is kept
        for unmerge (core's merge calls this once per merge)."""
        norm = self.weight_norm(name)
        self.merge_norms[name] = norm
        factor = self._factor_view(self.magnitude(name).detach().to(torch.float32) / norm.to(torch.float32))
        return factor * (weight + self.delta_weight(name).to(torch.float32))

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W = W' / (m / n) - s B A with the n of merge time."""
        restored = weight / self._merge_factor(name) - self.delta_weight(name).to(torch.float32)
        del self.merge_norms[name]
        return restored

    # ---- forward (Linear, Conv1D, Conv2d; Embedding overrides) -----------------------------------------

    def _bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        live = self.live_adapters()
        if not live:
            return result
        out_dtype = result.dtype
        bias = getattr(self.base_layer, "bias", None)
        for name in live:
            A, B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            h = adapter_input(x, A.weight.dtype, dropout)  # x as it is under autocast (lora/layer.py says why)
            scale = self.scale(name)
            if isinstance(dropout, nn.Identity) or not self.training:
                base = result if bias is None else result - self._bias_view(bias)  # everything before, without b
            else:
                h = dropout(h)
                base = self._base_without_bias(h)  # W x_d: the rescaled part must see the same input as B A
            result = result + ((scale - 1) * base + scale * B(A(h)) * self.scaling[name])
        return result.to(out_dtype)


class DoraLinear(DoraLayer, LoraLinear):
    """DoRA on nn.Linear (W (out, in)) and transformers' Conv1D (W stored (in, out)); m (out,)."""

    adapter_containers = LoraLinear.adapter_containers + ("lora_magnitude_vector", "merge_norms")

    def _fused_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The adapter the fused DoRA node can run alone, or None: lora/fused.py's conditions for the fused LoRA
        linear (switch on, no extra arguments, plain nn.Linear base, one live adapter, no dropout at work), and no
        adapter merged (forward's n is that of the unmerged weight, which the base layer then no longer holds)."""
        if self.merged_adapters or type(self.base_layer) is not nn.Linear or self.fan_in_fan_out:
            return None
        return fused_adapter(self, args, kwargs)  # with dropout at work the plain path (PEFT's form) runs

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(args, kwargs) if self.kernel_backend is not None else None
        if name is not None:
            base = self.base_layer
            return fused_dora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                     self.magnitude(name), self.scaling[name], backend=self.kernel_backend)
        return super().forward(x, *args, **kwargs)  # DoraLayer's plain forward

    def _rows(self, weight):
        return weight.T if self.fan_in_fan_out else weight

    def _factor_view(self, factor):
        return factor.reshape(1, -1) if self.fan_in_fan_out else factor.reshape(-1, 1)

    def _base_without_bias(self, x):
        weight = self._rows(self.base_layer.weight)  # (out, in)
        return F.linear(x, weight.to(x.dtype))


class DoraEmbedding(DoraLayer, LoraEmbedding):
    """DoRA on nn.Embedding (W (vocab, dim)): m (dim,), one norm per embedding dimension over the vocabulary."""

    adapter_containers = LoraEmbedding.adapter_containers + ("lora_magnitude_vector", "merge_norms")

    def _rows(self, weight):
        return weight.T  # (dim, vocab)

    def _update_rows(self, name):
        A, B = self.lora_pair(name)  # (r, vocab), (dim, r)
        return B @ A  # (dim, vocab)

    def _factor_view(self, factor):
        return factor.reshape(1, -1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        for name in self.live_adapters():
            A, B = self.lora_pair(name)
            scale = self.scale(name)  # (dim,)
            after_a = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                                  base.scale_grad_by_freq, base.sparse)  # (..., r)
            # PEFT's form: (m/n) * everything so far + (m/n) * s B A[:, t] (an embedding has no bias).
            result = (scale * result + scale * (after_a @ B.T) * self.scaling[name]).to(result.dtype)
        return result


class DoraConv2d(DoraLayer, LoraConv2d):
    """DoRA on nn.Conv2d (groups=1): one norm per output channel over (in, kh, kw); m and n (1, out, 1, 1)."""

    adapter_containers = LoraConv2d.adapter_containers + ("lora_magnitude_vector", "merge_norms")

    def _update_rows(self, name):
        A, B = self.lora_pair(name)  # (r, in, kh, kw), (out, r, 1, 1)
        r = A.shape[0]
        return (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(self.base_layer.weight.shape)  # (out, in, kh, kw)

    def _norm_of_rows(self, rows):
        # PEFT's shape: (out, 1, 1, 1) -> (1, out, 1, 1), which broadcasts over (N, out, H, W) outputs.
        return rows.norm(p=2, dim=tuple(range(1, rows.dim())), keepdim=True).transpose(1, 0)

    def _factor_view(self, factor):
        return factor.reshape(-1, 1, 1, 1)

    def _bias_view(self, bias):
        return bias.reshape(1, -1, 1, 1)

    def _base_without_bias(self, x):
        # _conv_forward keeps the base's padding_mode (reflect, circular, ...), which F.conv2d alone would not.
        return self.base_layer._conv_forward(x, self.base_layer.weight.to(x.dtype), None)
