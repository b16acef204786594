"""OFT layers: the input is rotated by a trained block-diagonal orthogonal matrix before the frozen layer.

Math (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", §3-4; PEFT 0.21's form). For a
linear layer y = W x + b with W (out, in), blocks of side k, n = in / k blocks:

    S_i = skew(θ_i)               θ_i (k(k-1)/2,) fills the strict upper triangle; S_i = U - U^T   (k, k)
    R_i = (I - S_i)(I + S_i)^-1   the Cayley map: orthogonal for any skew-symmetric S_i
    R = diag(R_1, ..., R_n)       (in, in)
    y = W (R^T x) + b             computed as base(x R) on row vectors x (..., in), block by block

so the merged weight is W R^T (Conv1D, weight stored (in, out): R W), and the bias is untouched. With
use_cayley_neumann (PEFT 0.21's default) R_i is instead the truncated Neumann series of the (equally orthogonal)
(I + S_i)(I - S_i)^-1 with m = num_cayley_neumann_terms terms, exactly as PEFT sums it:

    m = 1: I      m = 2: I + 2S      m = 3, 4: I + 2S + 2S² + S³      m >= 5: I + 2S + ... + 2S^(m-2) + S^(m-1)

which is only nearly orthogonal (error of order |S|^(m-1)), so unmerging inverts R rather than transposing it.

θ starts at 0 (R = I: identity at init). block_share: one θ for all blocks of a layer. COFT (constrained OFT):
before each use each block's θ is scaled, in place, so that |S_i|_F <= eps / sqrt(number of θ rows). module_dropout:
in training, a random int(p · n) of the blocks are replaced by I for one pass (the paper's multiplicative dropout;
PEFT 0.21 builds this layer but never calls it, so training with it differs from PEFT's, inference does not).

Files (PEFT's keys): θ is `<module>.oft_R.weight`, shape (n, k(k-1)/2) ((1, ...) with block_share); the block side is
not stored but recomputed from the config (r or oft_block_size, moved to the nearest divisor of in_features where it
does not divide it, PEFT's rule, with a warning).

Several active OFT adapters rotate the input one after another, in the order they are active (PEFT's order);
rotations do not commute, so merging some of them, which puts their rotation after the unmerged ones', changes the
result unless the rotations commute. PEFT behaves the same. peftlab's OFT wraps nn.Linear and transformers' Conv1D
(GPT-2; PEFT's OFT refuses Conv1D, so those files are peftlab's own); PEFT's Conv2d and Embedding OFT and BOFT
(butterfly-factored OFT) are not implemented.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...core.layer import AdapterLayer, linear_shape
from ..lora.layer import _adapter_dtype
from .config import OFTConfig


def nearest_divisor(size: int, wanted: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of `size` nearest to `wanted` (ties: the smaller one); `size`
    itself when wanted >= size."""
    if wanted >= size:
        return size
    higher = wanted
    while higher <= size and size % higher:
        higher += 1
    lower = wanted
    while lower > 1 and size % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def cayley_neumann(S: torch.Tensor, terms: int) -> torch.Tensor:
    """(b, k, k) skew-symmetric -> PEFT's truncated Neumann series of the Cayley map (module docstring)."""
    R = torch.eye(S.shape[-1], device=S.device, dtype=S.dtype).repeat(S.shape[0], 1, 1)
    if terms <= 1:
        return R
    R.add_(S, alpha=2.0)
    if terms == 2:
        return R
    power = torch.bmm(S, S)
    R.add_(power, alpha=2.0)
    for _ in range(3, terms - 1):
        power = torch.bmm(power, S)
        R.add_(power, alpha=2.0)
    R.add_(torch.bmm(power, S))  # the last term with weight 1
    return R


class OFTRotation(nn.Module):
    """One adapter's rotation on one layer: `weight` θ (rows, k(k-1)/2), rows = blocks (1 with block_share)."""

    def __init__(self, in_features: int, block_size: int, config: OFTConfig, dtype, device) -> None:
        super().__init__()
        self.block_size, self.n_blocks = block_size, in_features // block_size
        rows = 1 if config.block_share else self.n_blocks
        self.weight = nn.Parameter(torch.zeros(rows, block_size * (block_size - 1) // 2, dtype=dtype, device=device))
        self.coft, self.eps = config.coft, config.eps
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        self.dropout = config.module_dropout
        upper = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("upper", upper, persistent=False)  # not in files: PEFT's keys hold θ only

    def skew(self, theta: torch.Tensor) -> torch.Tensor:
        """θ (b, k(k-1)/2) -> S (b, k, k), S = U - U^T with U's strict upper triangle θ."""
        k = self.block_size
        U = torch.zeros(theta.shape[0], k, k, device=theta.device, dtype=theta.dtype)
        U[:, self.upper[0], self.upper[1]] = theta
        return U - U.transpose(-2, -1)

    @torch.no_grad()
    def constrain(self) -> None:
        """COFT: scale each θ row in place so that |S|_F <= eps / sqrt(rows) (PEFT's `_project_batch`)."""
        S = self.skew(self.weight)
        radius = self.eps / torch.sqrt(torch.tensor(float(S.shape[0])))
        norm = torch.linalg.matrix_norm(S, keepdim=True)  # (b, 1, 1) Frobenius
        # A block already on the sphere stays as it is: without the 1e-6 margin, every later use would rescale it
        # again by a rounding error (PEFT's test is norm <= radius), so θ and the outputs would drift at 1e-7.
        S = torch.where(norm <= radius * (1 + 1e-6), S, radius * (S / norm))
        self.weight.copy_(S[:, self.upper[0], self.upper[1]])

    def blocks(self) -> torch.Tensor:
        """R's diagonal blocks (n_blocks, k, k)."""
        if self.coft:
            self.constrain()
        S = self.skew(self.weight)
        if self.neumann:
            R = cayley_neumann(S, self.terms)
        else:
            eye = torch.eye(self.block_size, device=S.device, dtype=S.dtype).expand_as(S)
            R = torch.linalg.solve(eye + S, eye - S, left=False)  # X (I + S) = I - S
        if R.shape[0] != self.n_blocks:  # block_share: one rotation on every block
            R = R.repeat(self.n_blocks, 1, 1)
        if self.training and self.dropout > 0 and self.n_blocks > 1:
            dropped = torch.zeros(self.n_blocks, device=R.device, dtype=R.dtype)
            dropped[torch.randperm(self.n_blocks)[: int(self.dropout * self.n_blocks)].to(R.device)] = 1
            eye = torch.eye(self.block_size, device=R.device, dtype=R.dtype)
            R = torch.lerp(R, eye.expand_as(R), dropped.view(-1, 1, 1))
        return R

    def matrix(self) -> torch.Tensor:
        """R as one (in, in) block-diagonal matrix."""
        return torch.block_diag(*self.blocks())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> x R, block by block, in θ's dtype."""
        R = self.blocks()
        h = x.to(R.dtype).reshape(*x.shape[:-1], self.n_blocks, self.block_size)  # (..., n, k)
        return torch.einsum("...nk,nkc->...nc", h, R).reshape(x.shape)


class OFTLayer(AdapterLayer):
    """OFT on nn.Linear (weight (out, in)) or transformers' Conv1D (weight (in, out))."""

    adapter_containers = ("oft_R", "r", "oft_block_size")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.oft_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}

    def add_adapter(self, adapter_name: str, config: OFTConfig, module_name: str) -> None:
        if self.fan_in_fan_out:
            config.fan_in_fan_out = True  # record the (in, out) layout in the file, as LoRA does
        size = self.in_features
        given, field = (config.oft_block_size, "oft_block_size") if config.r == 0 else (config.r, "r")
        value = nearest_divisor(size, given) if size % given or given > size else given
        if value != given:
            warnings.warn(f"OFT on {module_name}: {field}={given} does not divide in_features={size}; using {value} "
                          "(the nearest divisor, as PEFT does).", UserWarning, stacklevel=3)
        block = value if field == "oft_block_size" else size // value
        self.r[adapter_name], self.oft_block_size[adapter_name] = size // block, block
        weight = self.base_layer.weight
        rotation = OFTRotation(size, block, config, _adapter_dtype(weight), weight.device)
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        self.oft_R[adapter_name] = rotation

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {"oft_R.weight": self.oft_R[adapter_name].weight}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = x
        for name in self.live_adapters():
            h = self.oft_R[name](h)
        return self.base_layer(h.to(x.dtype), *args, **kwargs)

    # ---- merging: W' = W R^T (Conv1D's stored (in, out): R W); not additive, so core's merge hooks are overridden --

    merge_label = "OFT "

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        R = self.oft_R[adapter_name].matrix().to(torch.float32)  # (in, in)
        return R @ weight if self.fan_in_fan_out else weight @ R.T

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        # R is only nearly orthogonal with the Neumann series: solve with R rather than multiply by R^T.
        R = self.oft_R[adapter_name].matrix().to(torch.float32)
        return torch.linalg.solve(R, weight) if self.fan_in_fan_out else torch.linalg.solve(R.T, weight, left=False)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """W R^T - W (the merge's change, in the stored layout), for code that asks for an additive update."""
        weight = self.base_layer.weight.detach().to(torch.float32)
        return self.merged_weight(adapter_name, weight) - weight
