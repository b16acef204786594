"""AdaLoRA's training-time parts: rank allocation (the `on_step` hook) and the orthogonality regulariser (the
`extra_loss` hook). The math is HF PEFT's `RankAllocator` / `AdaLoraModel.update_and_allocate` /
`AdaLoraModel.forward`, step for step, which is the AdaLoRA authors' reference code.

Importance (per entry w of P, E, Q of every adapted module, after step t's backward):
    I_t(w)      = |w * dL/dw|                                  sensitivity
    Ibar_t(w)   = beta1 * Ibar_{t-1}(w) + (1 - beta1) * I_t(w)           smoothed sensitivity
    U_t(w)      = beta2 * U_{t-1}(w) + (1 - beta2) * |I_t(w) - Ibar_t(w)|  uncertainty
    s(w)        = Ibar_t(w) * U_t(w)
Score of triplet i of a module (P (out, r), E (r, 1), Q (r, in)):
    S_i = s(E_i) + mean_j s(Q_ij) + mean_k s(P_ki)
Budget (total kept triplets over all modules) at step t, b0 = sum of the modules' r (init_r each), bT = target_r x
number of modules, T = total_step:
    t <= tinit:                 b = b0, no pruning
    tinit < t <= T - tfinal:    b = int((b0 - bT) * (1 - (t - tinit) / (T - tfinal - tinit))^3 + bT),
                                prune when t % deltaT == 0 (and always at t = T - tfinal)
    t > T - tfinal:             b = bT, the pattern fixed at T - tfinal is re-applied every step
Pruning to budget b: threshold = the (b0 - b)-th smallest S_i over all modules; every triplet with S_i <= threshold
gets E_i = 0 (the triplet stays, so it can come back while the budget still falls). The keep flags are recorded
as the adapter config's `rank_pattern` ({"<path>.lora_E": [bool] * r}, PEFT's file form), and at t = T - tfinal the
importance averages are dropped. Steps are the loop's: optimizer steps completed, from 1.

Orthogonality regulariser (added to the loss each training forward):
    R = orth_reg_weight * (1 / n) * sum over the n matrices M in {Q, P of every module} of ||C(M) - I_r||_F,
    C(Q) = Q Q^T (r, r),  C(P) = P^T P (r, r)
The paper writes ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (squared, summed); the authors' code and PEFT use the
unsquared Frobenius norm averaged over the matrices, and so does this file, for parity with PEFT.
"""

from __future__ import annotations

import torch

from .layer import TRIPLET, SVDLinear, kept_triplets, rank_pattern_key


def adapter_layers(model, adapter_name: str) -> list[tuple[str, SVDLinear]]:
    """(module path, layer) of every AdaLoRA layer carrying `adapter_name`, in module order."""
    return [(path, layer) for path, layer in model.adapter_layers()
            if isinstance(layer, SVDLinear) and adapter_name in layer.adapter_names]


def budgets(layers, adapter_name: str, config) -> tuple[int, int]:
    """(b0, bT): the starting and the final total number of triplets."""
    init_bgt = sum(layer.lora_A[adapter_name].shape[0] for _, layer in layers)
    return init_bgt, config.target_r * len(layers)


def budget_schedule(config, step: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """(budget, prune now?) at `step` (PEFT's RankAllocator.budget_schedule)."""
    tinit, tfinal, total_step = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt)
    return budget, step % config.deltaT == 0


@torch.no_grad()
def update_importance(layers, adapter_name: str, config) -> None:
    """One EMA step of sensitivity and uncertainty from the gradients now on P, E, Q. A tensor without a gradient
    (its module took no part in this step's forward) counts as having a zero gradient."""
    for _, layer in layers:
        state = layer.importance.setdefault(adapter_name, {})
        for t in TRIPLET:
            p = getattr(layer, t)[adapter_name]
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            ipt = (p * grad).abs()
            ema_ipt, ema_unc = state.get(t, (torch.zeros_like(p), torch.zeros_like(p)))
            ema_ipt = config.beta1 * ema_ipt + (1 - config.beta1) * ipt
            ema_unc = config.beta2 * ema_unc + (1 - config.beta2) * (ipt - ema_ipt).abs()
            state[t] = (ema_ipt, ema_unc)


def triplet_scores(layers, adapter_name: str) -> dict[str, torch.Tensor]:
    """{module path: (r,) score of each triplet}: s(E_i) + (mean_j s(Q_ij) + mean_k s(P_ki))."""
    out = {}
    for path, layer in layers:
        state = layer.importance[adapter_name]
        score = {t: state[t][0] * state[t][1] for t in TRIPLET}
        of_a = torch.mean(score["lora_A"], dim=1, keepdim=True)  # (r, 1)
        of_b = torch.mean(score["lora_B"], dim=0, keepdim=False).view(-1, 1)  # (r, 1)
        out[path] = score["lora_E"].view(-1) + torch.cat([of_a, of_b], dim=1).sum(dim=1).view(-1)
    return out


@torch.no_grad()
def mask_to_budget(layers, adapter_name: str, budget: int, init_bgt: int) -> dict[str, list[bool]]:
    """Zero E of every triplet scoring at or below the (init_bgt - budget)-th smallest score; return the keep
    flags as a rank_pattern. (A budget at b0 prunes nothing; PEFT would fail on kthvalue(k=0) there.)"""
    scores = triplet_scores(layers, adapter_name)
    k = init_bgt - budget
    threshold = (torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item() if k > 0
                 else float("-inf"))
    pattern = {}
    for path, layer in layers:
        pruned = scores[path] <= threshold  # (r,)
        layer.lora_E[adapter_name].masked_fill_(pruned.view(-1, 1), 0.0)
        pattern[rank_pattern_key(path)] = (~pruned).tolist()
    return pattern


@torch.no_grad()
def mask_using_rank_pattern(layers, adapter_name: str, rank_pattern: dict) -> None:
    """Zero E of the triplets the rank_pattern prunes (a module already built with only its kept triplets, as
    after loading, has nothing to zero)."""
    for path, layer in layers:
        keep = kept_triplets(rank_pattern, path, adapter_name)
        E = layer.lora_E[adapter_name]
        if keep is not None and len(keep) == E.shape[0]:
            E.masked_fill_(~torch.tensor(keep, device=E.device).view(-1, 1), 0.0)


def update_and_allocate(model, adapter_name: str, step: int) -> None:
    """The `on_step` hook: PEFT's `AdaLoraModel.update_and_allocate(step)`, run by the training loop after every
    optimizer step while the gradients are still there."""
    config = model.peft_config[adapter_name]
    if config.inference_mode:  # a frozen adapter is not being trained: nothing to allocate
        return
    layers = adapter_layers(model, adapter_name)
    if not layers:
        return
    init_bgt, target_bgt = budgets(layers, adapter_name, config)
    final = config.total_step - config.tfinal
    if step < final:
        update_importance(layers, adapter_name, config)
        budget, prune = budget_schedule(config, step, init_bgt, target_bgt)
        if prune:
            config.rank_pattern = mask_to_budget(layers, adapter_name, budget, init_bgt)
    elif step == final or config.rank_pattern is None:
        # The final allocation (also when training starts past T - tfinal, where PEFT would have no pattern yet).
        if any(adapter_name not in layer.importance for _, layer in layers):
            update_importance(layers, adapter_name, config)  # no averages yet (e.g. total_step = 1)
        budget, _ = budget_schedule(config, final, init_bgt, target_bgt)
        config.rank_pattern = mask_to_budget(layers, adapter_name, budget, init_bgt)
        for _, layer in layers:
            layer.importance.pop(adapter_name, None)
    else:
        mask_using_rank_pattern(layers, adapter_name, config.rank_pattern)


def orthogonal_regularizer(model, adapter_name: str) -> torch.Tensor | None:
    """The `extra_loss` hook: orth_reg_weight * mean over P, Q of ||C - I||_F (module docstring)."""
    config = model.peft_config[adapter_name]
    if config.inference_mode:
        return None
    layers = adapter_layers(model, adapter_name)
    total, count = 0, 0
    for _, layer in layers:
        for t in ("lora_A", "lora_B"):  # PEFT's order: A then B of each module
            p = getattr(layer, t)[adapter_name]
            cov = p @ p.T if t == "lora_A" else p.T @ p  # (r, r)
            eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    if count == 0:
        return None
    return config.orth_reg_weight * (total / count)
