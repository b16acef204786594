"""AdaLoRA layers: the update in SVD form, y = base(x) + (dropout(x) Q^T diag(E) P^T) * c / (ranknum + 1e-5).

Per adapter (HF PEFT's names, so state dicts and files line up without renaming):
    lora_A  Q  (r, in)   right singular vectors             file key `<path>.lora_A`
    lora_E  E  (r, 1)    singular values                    file key `<path>.lora_E`
    lora_B  P  (out, r)  left singular vectors              file key `<path>.lora_B`
    ranknum    (1,)      init_r, frozen, never saved (PEFT leaves it out of files: it is always init_r)
    c = lora_alpha (or r when lora_alpha <= 0, PEFT's rule)
so the merged update is
    delta_W = P (Q * E) * c / (ranknum + 1e-5)           (out, in); transposed to (in, out) for Conv1D.
r is init_r for a new adapter. Rank allocation (allocator.py) "prunes" a triplet (P[:, i], E[i], Q[i]) by setting
E[i] = 0 during training; saving drops pruned triplets from the file, and an adapter built from a config with a
`rank_pattern` (as when loading) has only the kept ones, r = their count. ranknum stays init_r in both cases, so
the output is the same before and after the round trip. A module whose triplets were all pruned has r = 0 and
adds nothing.

The computation follows PEFT's SVDLinear op for op ((x @ (Q * E)^T) @ P^T, then * c, then / (ranknum + 1e-5)),
so outputs match PEFT's bit for bit on the same weights and hardware.

On nn.Conv2d (PEFT's SVDConv2d; weight (out, in, kh, kw), groups=1): Q is (r, in * kh * kw), P (out, r), and
delta_W = (P (Q * E) * c / (ranknum + 1e-5)).reshape(out, in, kh, kw) is applied as a convolution with the base's
stride, padding and dilation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer, linear_shape
from .config import AdaLoraConfig

TRIPLET = ("lora_A", "lora_B", "lora_E")  # the trained tensors of one adapter, PEFT's names


def _adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    # fp32 adapters on a half-precision base, as PEFT does by default: the small update loses most of its bits
    # in fp16/bf16.
    return torch.float32 if base_weight.dtype in (torch.float16, torch.bfloat16) else base_weight.dtype


def rank_pattern_key(module_path: str) -> str:
    """The rank_pattern key of a module as PEFT writes it in adapter_config.json: `<path>.lora_E`."""
    return f"{module_path}.lora_E"


def kept_triplets(rank_pattern: dict | None, module_path: str, adapter_name: str) -> list[bool] | None:
    """This module's keep-flags from a rank_pattern, whose keys PEFT writes as `<path>.lora_E` (and holds in memory
    as `<path>.lora_E.<adapter>`); None when it has no entry."""
    if not rank_pattern:
        return None
    key = rank_pattern_key(module_path)
    for candidate in (key, f"{key}.{adapter_name}"):
        if candidate in rank_pattern:
            return list(rank_pattern[candidate])
    return None


class SVDLinear(AdapterLayer):
    """AdaLoRA on nn.Linear (weight (out, in)) or transformers' Conv1D (weight (in, out): `fan_in_fan_out`)."""

    adapter_containers = ("lora_A", "lora_B", "lora_E", "ranknum", "lora_dropout", "r", "lora_alpha", "scaling",
                          "importance")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        # A frozen parameter, as in PEFT (state-dict name `<path>.ranknum.<adapter>`); never saved to files.
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        # Rank-allocation state per adapter: {"lora_A"|"lora_B"|"lora_E": (EMA of sensitivity, EMA of
        # uncertainty)}, each the tensor's shape. Training-only, never saved (see allocator.py).
        self.importance: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def add_adapter(self, adapter_name: str, config: AdaLoraConfig, module_name: str) -> None:
        if self.fan_in_fan_out:
            config.fan_in_fan_out = True  # recorded in the file, as PEFT does for Conv1D (the model's own copy)
        keep = kept_triplets(config.rank_pattern, module_name, adapter_name)
        if keep is not None and len(keep) != config.init_r:
            raise ValueError(
                f"rank_pattern[{rank_pattern_key(module_name)!r}] has {len(keep)} flags but init_r={config.init_r}; "
                "the pattern must flag each of the init_r triplets. Check that the config's init_r is the one the "
                "adapter was trained with."
            )
        r = config.init_r if keep is None else sum(keep)
        weight = self.base_layer.weight
        dtype, device = _adapter_dtype(weight), weight.device
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        self.lora_dropout[adapter_name] = (nn.Dropout(config.lora_dropout) if config.lora_dropout > 0
                                           else nn.Identity())
        self.lora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_E[adapter_name] = nn.Parameter(torch.empty(r, 1, dtype=dtype, device=device))
        self.lora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device))
        # Always init_r, also when the adapter is built with fewer (kept) triplets: PEFT copies the old ranknum
        # back after resizing, so the scale c / init_r of the kept triplets does not change.
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), float(config.init_r), dtype=dtype, device=device),
                                                  requires_grad=False)
        with torch.no_grad():
            if config.init_lora_weights:
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)
            else:
                for t in TRIPLET:
                    nn.init.normal_(getattr(self, t)[adapter_name])

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {t: getattr(self, t)[adapter_name] for t in TRIPLET}

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B, E = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        delta = B @ (A * E)  # (out, r) @ (r, in)
        if self.fan_in_fan_out:
            delta = delta.T
        return delta * self.scaling[adapter_name] / (self.ranknum[adapter_name] + 1e-5)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            A, B, E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            h = self.lora_dropout[name](x.to(A.dtype))
            update = (h @ (A * E).T @ B.T) * self.scaling[name] / (self.ranknum[name] + 1e-5)
            result = result + update.to(result.dtype)
        return result


class SVDConv2d(SVDLinear):
    """AdaLoRA on nn.Conv2d (groups=1): the kernel's update is P (Q * E) reshaped to the base weight's shape."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise ValueError(
                f"AdaLoRA on Conv2d supports groups=1 only; this layer has groups={base_layer.groups}. Leave it out "
                "with exclude_modules, or target the pointwise convs instead."
            )
        AdapterLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        out_c, in_c, kh, kw = base_layer.weight.shape
        self.in_features, self.out_features = in_c * kh * kw, out_c  # Q is (r, in * kh * kw), as in PEFT
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.importance = {}

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B, E = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        delta = B @ (A * E) * self.scaling[adapter_name] / (self.ranknum[adapter_name] + 1e-5)
        return delta.reshape(self.base_layer.weight.shape)  # (out, in, kh, kw)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        for name in self.live_adapters():
            A = self.lora_A[name]
            h = self.lora_dropout[name](x.to(A.dtype))
            update = F.conv2d(h, self.delta_weight(name), stride=base.stride, padding=base.padding,
                              dilation=base.dilation, groups=base.groups)
            result = result + update.to(result.dtype)
        return result
