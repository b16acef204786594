"""`add_weighted_adapter` for LoRA: a new adapter from weighted existing ones (HF PEFT's three rules).

With weights w_i, scalings s_i and the new adapter's scaling fixed at 1 (lora_alpha = r, no rsLoRA):
- "cat":    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]  =>  B A = sum_i w_i s_i B_i A_i exactly.
            Rank = the sum of the ranks.
- "svd":    D = sum_i w_i s_i B_i A_i, then the best rank-k approximation U_k S_k V_k^T: B = U_k S_k, A = V_k^T.
            Exact when k >= rank(D); k = svd_rank or the largest input rank.
- "linear": A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i. Cheap but not the sum of
            the updates (cross terms B_i A_j appear); all inputs need the same rank. PEFT's rule, kept for parity.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .layer import LoraLayer

COMBINATIONS = ("svd", "cat", "linear")


def combine_lora(model, adapters: list[str], weights: list[float], adapter_name: str,
                 combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                 svd_full_matrices: bool = False, svd_driver: str | None = None) -> None:
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type={combination_type!r} is not supported for LoRA; use one of {COMBINATIONS}.")
    configs = [model.peft_config[a] for a in adapters]
    if any(c.modules_to_save for c in configs):
        raise ValueError(
            "Some of these adapters carry modules_to_save (e.g. a classifier head), which cannot be combined by "
            "weighting. Combine adapters without them, or average the heads yourself."
        )
    layers = [(path, layer) for path, layer in model.adapter_layers() if any(a in layer.adapter_names for a in adapters)]
    ranks = [[layer.r[a] for a in adapters if a in layer.r] for _, layer in layers]
    if combination_type == "linear":
        if any(len(set(rs)) > 1 for rs in ranks):
            raise ValueError("combination_type='linear' needs every adapter to have the same rank on each layer; "
                             "use 'cat' or 'svd' for adapters of different ranks.")
        new_rank = max(max(rs) for rs in ranks)
    elif combination_type == "cat":
        new_rank = max(sum(rs) for rs in ranks)
    else:
        new_rank = svd_rank or max(max(rs) for rs in ranks)

    new_config = dataclasses.replace(
        configs[0], r=new_rank, lora_alpha=new_rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
        target_modules=[path for path, _ in layers], exclude_modules=None, layers_to_transform=None,
        layers_pattern=None, init_lora_weights=True, lora_dropout=configs[0].lora_dropout,
    )
    model.add_adapter(adapter_name, new_config)
    with torch.no_grad():
        for _, layer in layers:
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
            A_new, B_new = layer.lora_pair(adapter_name)
            A_new.zero_()
            B_new.zero_()
            if combination_type == "cat":
                A = torch.cat([layer.lora_pair(a)[0] * (w * layer.scaling[a]) for a, w in present], dim=0)
                B = torch.cat([layer.lora_pair(a)[1] for a, _ in present], dim=1)
                A_new[: A.shape[0]] = A
                B_new[:, : B.shape[1]] = B
            elif combination_type == "linear":
                for a, w in present:
                    ws = w * layer.scaling[a]
                    A_i, B_i = layer.lora_pair(a)
                    A_new += math.copysign(math.sqrt(abs(ws)), ws) * A_i
                    B_new += math.sqrt(abs(ws)) * B_i
            else:
                A, B = _svd_factors(layer, present, new_rank, svd_clamp, svd_full_matrices, svd_driver)
                A_new.copy_(A.reshape(A_new.shape))
                B_new.copy_(B.reshape(B_new.shape))
    model._refresh_trainable()


def _svd_factors(layer: LoraLayer, present, rank, clamp, full_matrices, driver):
    """Rank-`rank` factors (A, B) of sum_i w_i * delta_i, in the layout of this layer's A and B."""
    delta = sum(w * layer.delta_weight(a).to(torch.float32) for a, w in present)
    # Bring the update to the (out, in...) orientation of B @ A.
    if layer.is_embedding or getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    matrix = delta.flatten(1)  # Conv2d: (out, in * kh * kw)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    B = torch.zeros(matrix.shape[0], rank)
    A = torch.zeros(rank, matrix.shape[1])
    B[:, :k] = U[:, :k] * S[:k]
    A[:k] = Vh[:k]
    if clamp is not None:  # PEFT's outlier clamp: cut both factors at the given quantile of their values
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B
