"""The sparse delta beside a frozen linear weight: W_eff = W + scatter(values at flat indices).

For adapter a on a layer with weight W (stored shape S: (out, in) for nn.Linear, (in, out) for Conv1D), indices
I_a (k_a,) are flat positions in W as stored (row-major) and values v_a (k_a,) the trained changes:
    W_eff = W + Σ_a scatter(I_a, v_a),      y = x W_eff^T + b   (Conv1D: y = x W_eff + b)
so an entry outside every I_a is W's own.

`SparseDeltaLinear` computes this without keeping W_eff alive between forward and backward: it saves x (as LoRA
saves x for its A) and rebuilds W_eff in backward, where
    ∂L/∂v_a = (∂L/∂W_eff) at I_a,   ∂L/∂W_eff = g^T x (nn.Linear, (out, in)) or x^T g (Conv1D, (in, out)),
g = ∂L/∂y flattened over positions. Plain autograd (F.linear(x, W + scatter(v))) would save W_eff itself for every
layer until backward: one copy of every candidate weight in activation memory (SmolLM2-135M, all linear layers:
106M numbers, 425 MB in fp32). Transient memory here: W_eff and ∂L/∂W_eff of one layer at a time (at most
1536 x 576 x 4 B = 3.5 MB each in SmolLM2).

Precision: values train in fp32 whatever the base's dtype. With a bf16/fp16 base, W_eff is formed in the base's
dtype, as mixed-precision training forms a bf16 copy of fp32 master weights: a change smaller than half a bf16
step of its weight (~0.2% of it) does not show in the forward yet, while it keeps accumulating in fp32.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer, linear_shape
from ...core.tuner import SharedTensors
from .config import SelectiveConfig


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices while they fit (every linear weight below 2^31 entries), else int64: half the bytes per entry."""
    return torch.int32 if numel < 2**31 else torch.int64


def _effective_weight(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    w = weight.detach().clone()
    w.view(-1).index_add_(0, indices, values.detach().to(w.dtype))
    return w


def _apply(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """The base layer's own op on weight w: nn.Linear's F.linear, or Conv1D's addmm (bitwise as the base computes)."""
    if not transposed:
        return F.linear(x, w, bias)
    shape = x.shape[:-1] + (w.shape[1],)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, flat, w) if bias is not None else flat @ w
    return out.view(shape)


class SparseDeltaLinear(torch.autograd.Function):
    """y = base op(x, W + scatter(indices, values), b); see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, transposed):
        w = _effective_weight(weight, values, indices)
        ctx.save_for_backward(x, weight, values, indices)
        ctx.transposed = transposed
        ctx.has_bias = bias is not None
        return _apply(x, w, bias, transposed)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, values, indices = ctx.saved_tensors
        transposed = ctx.transposed
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        xs = x.reshape(-1, x.shape[-1]).to(g.dtype)  # (N, in)
        grad_x = grad_weight = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            w = _effective_weight(weight, values, indices).to(g.dtype)
            grad_x = (g @ (w.t() if transposed else w)).view(x.shape).to(x.dtype)
            del w
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            full = xs.t() @ g if transposed else g.t() @ xs  # ∂L/∂W_eff, as W is stored
            if ctx.needs_input_grad[3]:
                grad_values = full.view(-1)[indices].to(values.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = full.to(weight.dtype)
            del full
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(grad_out.dtype)
        return grad_x, grad_weight, grad_bias, grad_values, None, None


def random_indices(numel: int, density: float, seed_text: str) -> torch.Tensor:
    """round(density * numel) distinct flat indices (at least 1), ascending, drawn from a generator seeded by
    `seed_text` (the module path): the same model and config give the same selection in every process."""
    k = max(1, round(density * numel))
    g = torch.Generator().manual_seed(zlib.crc32(seed_text.encode()))
    return torch.randperm(numel, generator=g)[:k].sort().values.to(index_dtype(numel))


class SelectiveLinear(AdapterLayer):
    """A linear layer (nn.Linear or Conv1D) with one sparse delta per adapter: `selective_values[a]` (k,) trains,
    `selective_indices[a]` (k,) says where (a buffer: it never trains)."""

    adapter_containers = ("selective_values", "selective_indices")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.selective_values = nn.ParameterDict()
        self.selective_indices = SharedTensors()  # buffers keyed by adapter name
        self.transposed = linear_shape(base_layer)[2]

    def add_adapter(self, adapter_name: str, config: SelectiveConfig, module_name: str) -> None:
        weight = self.base_layer.weight
        indices = random_indices(weight.numel(), config.density, module_name)
        self.set_selection(adapter_name, indices.to(weight.device), torch.zeros(len(indices), device=weight.device))

    def set_selection(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Make (indices, values) adapter `adapter_name`'s delta, on the weight's device, values in fp32 for a half
        precision base (a bf16 value would round most optimizer updates away). The same k: copied into the existing
        tensors, so an optimizer built on them keeps them (a checkpoint loaded on resume). Another k: new tensors,
        trainable as the old values were (build the optimizer after selecting)."""
        weight = self.base_layer.weight
        old = self.selective_values[adapter_name] if adapter_name in self.selective_values else None
        idx = indices.to(weight.device, index_dtype(weight.numel()))
        if old is not None and old.numel() == len(idx):
            with torch.no_grad():
                old.copy_(values.to(old.dtype))
                self.selective_indices[adapter_name].copy_(idx)
            return
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        trainable = old is not None and old.requires_grad
        self.selective_values[adapter_name] = nn.Parameter(values.detach().to(weight.device, dtype).clone(),
                                                           requires_grad=trainable)
        self.selective_indices.add(adapter_name, idx, True)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"selective_indices": self.selective_indices[adapter_name],
                "selective_values": self.selective_values[adapter_name]}

    def trainable_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {"selective_values": self.selective_values[adapter_name]}

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge()
        self.selective_values.pop(adapter_name, None)
        self.selective_indices.remove(adapter_name)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.base_layer.weight
        delta = torch.zeros(weight.shape, dtype=self.selective_values[adapter_name].dtype, device=weight.device)
        delta.view(-1).index_add_(0, self.selective_indices[adapter_name], self.selective_values[adapter_name])
        return delta

    # Merging adds the k values into the fp32 copy of W in place: no dense (out, in) delta is built.
    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.view(-1).index_add(0, self.selective_indices[adapter_name],
                                         self.selective_values[adapter_name].float()).view(weight.shape)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.view(-1).index_add(0, self.selective_indices[adapter_name],
                                         self.selective_values[adapter_name].float(), alpha=-1).view(weight.shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        live = self.live_adapters()
        base = self.base_layer
        if not live and not base.weight.requires_grad:
            return base(x, *args, **kwargs)
        # Several live adapters: their deltas add up (index_add sums repeated positions), and autograd splits the
        # gradient of the concatenated values back to each adapter.
        indices = torch.cat([self.selective_indices[a] for a in live]) if live else \
            torch.zeros(0, dtype=torch.int64, device=base.weight.device)
        values = torch.cat([self.selective_values[a] for a in live]) if live else \
            torch.zeros(0, device=base.weight.device)
        return SparseDeltaLinear.apply(x, base.weight, base.bias, values, indices, self.transposed)
