"""LoHa layers, and `LycorisLayer`, the bookkeeping LoHa and LoKr share.

Both LyCORIS methods build a full-size update ΔW from small factors on every forward and add its output:

    y = base(x) + ΔW x            (Linear; Conv1D computes the same with its stored (in, out) weight)
    y = base(x) + conv(x, ΔW)     (Conv2d: ΔW has the kernel's shape (out, in/groups, kh, kw), same stride/padding)

LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning",
§3; the LyCORIS form PEFT implements), with s = alpha / r:

    ΔW = s (W1a W1b) ⊙ (W2a W2b)         W1a, W2a (out, r)   W1b, W2b (r, in·kh·kw)   -> reshaped to the weight

Each factor product has rank <= r, their Hadamard product rank <= r²: LoRA's parameter count at up to r² the rank.
Conv2d with use_effective_conv2d (kernel larger than 1x1; FedPara's Proposition 3, a Tucker/CP core per factor):

    ΔW[o, i, h, w] = s (Σ_ab T1[a, b, h, w] W1a[a, o] W1b[b, i]) ⊙ (the same with T2, W2a, W2b)
                     T1, T2 (r, r, kh, kw)   W1a, W2a (r, out)   W1b, W2b (r, in)

Init (PEFT's, after FedPara's He init): W1a, W1b, W2a Kaiming-uniform (a=√5, nn.Linear's rule), W2b zero, so ΔW = 0
and the adapter starts as identity; init_weights=False draws W2b too (not identity, for tests). The draws are made
in PEFT's order (W1a, W1b, W2a, [W2b], T1, T2), so the same torch seed gives PEFT's tensors.

Training-time regularisers (as PEFT's): rank_dropout zeroes each output row of ΔW with probability p (LoHa rescales
the kept rows by 1 / kept fraction); module_dropout skips the whole update with probability p. Neither acts in eval
mode, nor when merging.

Tensor names follow PEFT (`hada_w1_a.<adapter>` in the model, `<module>.hada_w1_a` in files). PEFT's LoHa wraps
nn.Linear, nn.Conv1d and nn.Conv2d; peftlab also wraps transformers' Conv1D (GPT-2), which PEFT refuses, so those
files stay peftlab's own. torch's nn.Conv1d is not wrapped here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer, linear_shape
from ...core.targets import pattern_value
from ..lora.layer import _adapter_dtype


def kaiming_(t: torch.Tensor) -> None:
    """nn.Linear's default init (Kaiming-uniform, a = √5), the rule PEFT uses for every random LyCORIS factor."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LycorisLayer(AdapterLayer):
    """What LoHa and LoKr share: per-adapter rank, alpha, scaling and dropouts; a ΔW built by the subclass
    (`build_delta`, in the conv kernel's or (out, in) shape); forward, rank/module dropout and merging from it.

    Subclasses set `factor_names` (their ParameterDict attributes) and `adapter_containers` (`shared_containers` +
    `factor_names`), and implement
    `create_factors(name, r, config)` and `build_delta(name)`."""

    factor_names: tuple[str, ...] = ()
    # Per-adapter dicts; "r" first: AdapterLayer lists the adapters from the first container, and every adapter has
    # an r while some factors exist only in some layouts (hada_t1 only for effective convs).
    shared_containers = ("r", "alpha", "scaling", "rank_dropout", "module_dropout", "rank_dropout_scale")
    rescale_rank_dropout = True  # LoHa: always; LoKr: per its config's rank_dropout_scale

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if isinstance(base_layer, nn.Conv2d):
            self.in_features, self.out_features = base_layer.in_channels // base_layer.groups, base_layer.out_channels
            self.fan_in_fan_out, self.kernel_size = False, tuple(base_layer.kernel_size)
        else:
            self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
            self.kernel_size = ()
        for attr in self.factor_names:
            setattr(self, attr, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel_size)

    def effective_conv(self, config) -> bool:
        """Whether this layer holds the kernel in a core tensor: Conv2d, use_effective_conv2d, kernel not 1x1 (a 1x1
        kernel is a matrix, which PEFT then keeps flat too)."""
        return self.is_conv and config.use_effective_conv2d and self.kernel_size != (1, 1)

    def delta_shape(self) -> tuple[int, ...]:
        """ΔW's shape before the layout fix for Conv1D: (out, in) or (out, in/groups, kh, kw)."""
        return (self.out_features, self.in_features, *self.kernel_size)

    def new_factor(self, attr: str, adapter_name: str, *shape: int) -> nn.Parameter:
        weight = self.base_layer.weight
        p = nn.Parameter(torch.empty(*shape, dtype=_adapter_dtype(weight), device=weight.device))
        getattr(self, attr)[adapter_name] = p
        return p

    # ---- to implement ------------------------------------------------------------------------------

    def create_factors(self, adapter_name: str, r: int, config) -> None:
        raise NotImplementedError

    def build_delta(self, adapter_name: str) -> torch.Tensor:
        """s times the method's ΔW, in `delta_shape()` (any shape with that many entries, reshaped by the caller)."""
        raise NotImplementedError

    # ---- the shared part ---------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config, module_name: str) -> None:
        r = pattern_value(module_name, config.rank_pattern, config.r)
        alpha = pattern_value(module_name, config.alpha_pattern, config.alpha)
        self.r[adapter_name], self.alpha[adapter_name], self.scaling[adapter_name] = r, alpha, alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.rank_dropout_scale[adapter_name] = getattr(config, "rank_dropout_scale", self.rescale_rank_dropout)
        with torch.no_grad():
            self.create_factors(adapter_name, r, config)

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {attr: getattr(self, attr)[adapter_name] for attr in self.factor_names
                if adapter_name in getattr(self, attr)}

    def update(self, adapter_name: str, training: bool) -> torch.Tensor:
        """ΔW in `delta_shape()`, with rank dropout applied when `training`."""
        delta = self.build_delta(adapter_name).reshape(self.delta_shape())
        p = self.rank_dropout[adapter_name]
        if training and p > 0:
            keep = (torch.rand(delta.shape[0]) > p).to(device=delta.device, dtype=delta.dtype)  # (out,)
            if self.rank_dropout_scale[adapter_name]:
                keep = keep / keep.mean().clamp_min(1e-12)  # all rows dropped: the update is 0, not NaN
            delta = delta * keep.view(-1, *[1] * (delta.ndim - 1))
        return delta

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.update(adapter_name, training=False)
        return delta.T if self.fan_in_fan_out else delta  # Conv1D stores (in, out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            p = self.module_dropout[name]
            if self.training and p > 0 and torch.rand(1).item() <= p:
                continue  # PEFT applies the update when rand > p
            delta = self.update(name, self.training)
            h = x.to(delta.dtype)
            if self.is_conv:
                conv = self.base_layer
                out = F.conv2d(h, delta, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                               groups=conv.groups)
            else:
                out = F.linear(h, delta)  # (..., out); delta is (out, in) for Conv1D too
            result = result + out.to(result.dtype)
        return result


class LoHaLayer(LycorisLayer):
    """LoHa on nn.Linear, transformers' Conv1D or nn.Conv2d (module docstring)."""

    factor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    adapter_containers = LycorisLayer.shared_containers + factor_names

    def create_factors(self, adapter_name: str, r: int, config) -> None:
        out_f, in_f = self.out_features, self.in_features
        if self.effective_conv(config):
            kh, kw = self.kernel_size
            factors = [self.new_factor("hada_w1_a", adapter_name, r, out_f),
                       self.new_factor("hada_w1_b", adapter_name, r, in_f),
                       self.new_factor("hada_w2_a", adapter_name, r, out_f),
                       self.new_factor("hada_w2_b", adapter_name, r, in_f)]
            cores = [self.new_factor("hada_t1", adapter_name, r, r, kh, kw),
                     self.new_factor("hada_t2", adapter_name, r, r, kh, kw)]
        else:
            flat_in = in_f * math.prod(self.kernel_size)  # (in, kh, kw) flattened into one axis
            factors = [self.new_factor("hada_w1_a", adapter_name, out_f, r),
                       self.new_factor("hada_w1_b", adapter_name, r, flat_in),
                       self.new_factor("hada_w2_a", adapter_name, out_f, r),
                       self.new_factor("hada_w2_b", adapter_name, r, flat_in)]
            cores = []
        for t in factors[:3]:
            kaiming_(t)
        if config.init_weights:
            nn.init.zeros_(factors[3])  # W2b = 0: ΔW = 0 at init
        else:
            kaiming_(factors[3])
        for t in cores:
            kaiming_(t)

    def build_delta(self, adapter_name: str) -> torch.Tensor:
        w1a, w1b = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        w2a, w2b = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        s = self.scaling[adapter_name]
        if adapter_name in self.hada_t1:
            t1, t2 = self.hada_t1[adapter_name], self.hada_t2[adapter_name]
            # (r, r, kh, kw) core x (r, out) x (r, in) -> (out, in, kh, kw) for each factor
            one = torch.einsum("abhw,ao,bi->oihw", t1, w1a, w1b)
            two = torch.einsum("abhw,ao,bi->oihw", t2, w2a, w2b)
            return one * two * s
        return ((w1a @ w1b) * (w2a @ w2b)) * s  # (out, r)(r, in) ⊙ (out, r)(r, in)
