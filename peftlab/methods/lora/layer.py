"""LoRA layers: y = base(x) + scaling * B(A(dropout(x))), scaling = alpha / r (alpha / sqrt(r) with rsLoRA).

Three wrappers share the bookkeeping in `LoraLayer`:
- `LoraLinear` for nn.Linear and transformers' Conv1D (GPT-2, weight stored (in, out): `fan_in_fan_out`);
- `LoraEmbedding` for nn.Embedding (A: (r, vocab) looked up by token id, B: (dim, r));
- `LoraConv2d` for nn.Conv2d (A: a conv with the base's kernel into r channels, B: a 1x1 conv out).
Parameter names follow HF PEFT (`lora_A.<adapter>.weight`, `lora_embedding_A.<adapter>`), so state dicts
and files line up with PEFT's without renaming.

Adapter weights are kept in fp32 when the base is fp16/bf16 (as PEFT does by default): the low-rank
update is small next to W, and half-precision optimizer updates on it lose most of their bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer, linear_shape
from ...core.targets import pattern_value
from .fused import fused_forward
from .config import LoraConfig
from .init import initialise


def _adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    # fp32 also for a quantised base's integer codes (bitsandbytes' uint8), as PEFT keeps adapters there
    half = base_weight.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half or not base_weight.is_floating_point() else base_weight.dtype


class LoraLayer(AdapterLayer):
    """Per-adapter rank, alpha, scaling and dropout, plus the steps every LoRA wrapper shares."""

    is_embedding = False
    pair_names = ("lora_A", "lora_B")  # attributes holding A and B; file keys derive from them

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()

    adapter_containers = ("lora_A", "lora_B", "lora_dropout", "r", "lora_alpha", "scaling")

    def _make_pair(self, r: int, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def lora_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) weight tensors of adapter `name` (what the initialisers and merges work on)."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        r = pattern_value(module_name, config.rank_pattern, config.r)
        alpha = pattern_value(module_name, config.alpha_pattern, config.lora_alpha)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        weight = self.base_layer.weight
        A, B = self._make_pair(r, _adapter_dtype(weight), weight.device)
        getattr(self, self.pair_names[0])[adapter_name] = A
        getattr(self, self.pair_names[1])[adapter_name] = B
        with torch.no_grad():
            initialise(self, adapter_name, config)

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        a, b = self.pair_names
        A, B = getattr(self, a)[adapter_name], getattr(self, b)[adapter_name]
        if isinstance(A, nn.Parameter):
            return {a: A, b: B}
        return {f"{a}.weight": A.weight, f"{b}.weight": B.weight}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Linear and Conv2d: A and B are modules; Embedding overrides this.
        result = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            A, B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](adapter_input(x, A.weight.dtype, self.lora_dropout[name]))
            result = result + (B(A(h)) * self.scaling[name]).to(result.dtype)
        return result


def adapter_input(x: torch.Tensor, dtype: torch.dtype, dropout: nn.Module) -> torch.Tensor:
    """x as A's matmul should get it: cast to the adapter's dtype (fp32 A on a 16-bit base), except under autocast
    with x already in the autocast dtype and no dropout at work. There A's matmul runs in the autocast dtype anyway,
    so casting up would only make two copies of x (fp32, then autocast's exact cast back down), and each adapter would
    keep its own 16-bit copy for backward. Taking x as it is gives the same numbers bit for bit; the adapters reading
    one x (q, k, v; gate, up) keep it once (a frozen base layer keeps only its weight), and no fp32 copy (2-6 MB per
    adapter and call at 1 x 256 tokens of a 1.1B Llama) is made and freed between the kept tensors. (With dropout at
    work the mask is applied in fp32, as before.)"""
    device = x.device.type
    if (torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device)
            and (isinstance(dropout, nn.Identity) or not dropout.training)):
        return x
    return x.to(dtype)


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear (weight (out, in)) or transformers' Conv1D (weight (in, out))."""

    kernel_backend: str | None = None
    """Set by `peftlab.kernels.enable(model, backend)`: run the fused LoRA linear where it computes this forward
    exactly (methods/lora/fused.py lists when); None: always the plain forward."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        if self.fan_in_fan_out:
            # Record the (in, out) layout in the config, as PEFT does when it meets a Conv1D: the file must say
            # how B A is laid out for tools that merge from it. (The config is the model's own copy.)
            config.fan_in_fan_out = True
        super().add_adapter(adapter_name, config, module_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.kernel_backend is not None:
            y = fused_forward(self, x, args, kwargs)
            if y is not None:
                return y
        return super().forward(x, *args, **kwargs)

    def _make_pair(self, r, dtype, device):
        A = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        B = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)
        return A, B

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_pair(adapter_name)
        delta = (B @ A) * self.scaling[adapter_name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: the update for token t is scaling * B @ A[:, t] (no dropout, as in PEFT)."""

    is_embedding = True
    pair_names = ("lora_embedding_A", "lora_embedding_B")
    adapter_containers = ("lora_embedding_A", "lora_embedding_B", "lora_dropout", "r", "lora_alpha", "scaling")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _make_pair(self, r, dtype, device):
        vocab, dim = self.base_layer.weight.shape
        A = nn.Parameter(torch.empty(r, vocab, dtype=dtype, device=device))
        B = nn.Parameter(torch.empty(dim, r, dtype=dtype, device=device))
        return A, B

    def lora_pair(self, name):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_pair(adapter_name)
        return (B @ A).T * self.scaling[adapter_name]  # (vocab, dim), the embedding table's shape

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        for name in self.live_adapters():
            A, B = self.lora_pair(name)
            after_a = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                                  base.scale_grad_by_freq, base.sparse)  # (..., r)
            result = result + ((after_a @ B.T) * self.scaling[name]).to(result.dtype)
        return result


class LoraConv2d(LoraLayer):
    """LoRA on nn.Conv2d: A is a conv with the base's kernel/stride/padding into r channels, B a 1x1 conv."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ValueError(
                f"LoRA on Conv2d supports groups=1 only; this layer has groups={base_layer.groups}. "
                "Leave it out with exclude_modules, or target the pointwise convs instead."
            )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _make_pair(self, r, dtype, device):
        base = self.base_layer
        A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                      bias=False, dtype=dtype, device=device)
        B = nn.Conv2d(r, base.out_channels, 1, 1, bias=False, dtype=dtype, device=device)
        return A, B

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_pair(adapter_name)  # (r, in, kh, kw), (out, r, 1, 1)
        if A.shape[2:] == (1, 1):
            delta = (B.flatten(1) @ A.flatten(1))[:, :, None, None]
        else:
            # Compose the two convs into one kernel: treat A's input channels as a batch.
            delta = F.conv2d(A.permute(1, 0, 2, 3), B).permute(1, 0, 2, 3)  # (out, in, kh, kw)
        return delta * self.scaling[adapter_name]
