"""LoRA-drop's steps as a Python API, and the `prepare` hook that runs them inside `peftlab train`.

    scores = layer_scores(model, batches)              # {layer path: g_l = mean ||ΔW_l x||^2 over the batches}
    table = importance_table(scores, threshold=0.9)    # rows by importance I_l descending: cumulative, kept
    groups = share_layers(model, [row["layer"] for row in table if row["kept"]])   # tie the others together

`select_layers(model, batches, threshold=..., top_n=...)` is the first two in one call. The math is in
peftlab/methods/lora_drop/__init__.py. The functions work on any adapter made of plain LoRA linear layers
(`LoraLinear`: methods lora, lora_plus and lora_drop), so a `lora` model trained by hand can be pruned the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..lora.layer import LoraLinear

IMPORTANCE_FILE = "lora_drop_importance.json"

# Batch keys that are not model inputs (the collator's labels, and packed rows' per-example lengths).
NOT_INPUTS = ("labels", "seq_lens")

# Summed normalised importances can land just below a threshold they reach exactly in real numbers
# (0.7 + 0.2 = 0.8999999999999999 < 0.9): a prefix within this of the threshold counts as reaching it.
TOLERANCE = 1e-9


def lora_linears(model, adapter_name: str = "default") -> list[tuple[str, LoraLinear]]:
    """[(module path, layer)] of the adapter, in model order; refuses layers that are not plain LoRA linear layers."""
    model._check_known(adapter_name)
    layers = [(p, m) for p, m in model.adapter_layers() if adapter_name in m.adapter_names]
    bad = [(p, type(m).__name__) for p, m in layers if type(m) is not LoraLinear]
    if bad:
        raise TypeError(
            f"LoRA-drop scores and shares plain LoRA linear layers (LoraLinear, which lora, lora_plus and lora_drop "
            f"put on nn.Linear/Conv1D); adapter {adapter_name!r} has a {bad[0][1]} at {bad[0][0]!r} ({len(bad)} such "
            f"layers). Leave those modules out, e.g. exclude_modules={[p for p, _ in bad[:3]]!r}.")
    return layers


def token_mask(batch: dict) -> torch.Tensor | None:
    """(B, T) float mask, 1 on real tokens and 0 on padding: the 2-D attention_mask, or for packed rows (4-D mask)
    the positions before the sum of the row's seq_lens. None when the batch says neither (every position counts)."""
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2:
        return mask.float()
    lens, ids = batch.get("seq_lens"), batch.get("input_ids")
    if torch.is_tensor(lens) and torch.is_tensor(ids):
        real = lens.sum(-1)
        return (torch.arange(ids.shape[1], device=real.device)[None, :] < real[:, None]).float()
    return None


@torch.no_grad()
def _score_sums(model, batches: Iterable[dict], adapter_name: str) -> tuple[dict[str, float], dict[str, int]]:
    """({path: sum of ||ΔW x||^2}, {path: number of positions}) over the batches, in eval mode (no dropout)."""
    layers = lora_linears(model, adapter_name)
    sums = {p: 0.0 for p, _ in layers}
    counts = {p: 0 for p, _ in layers}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(path):
        def hook(module, args, output):
            x = args[0]  # (..., in): this layer's input, one vector per position
            A, B = module.lora_A[adapter_name], module.lora_B[adapter_name]
            delta = B(A(x.to(A.weight.dtype))) * module.scaling[adapter_name]  # ΔW x = s B A x: (..., out)
            sq = delta.float().pow(2).sum(-1)  # ||ΔW x||^2 per position: (...)
            mask = current["mask"]
            if mask is not None and tuple(sq.shape) == tuple(mask.shape):
                sums[path] += float((sq * mask.to(sq.device)).sum())
                counts[path] += int(mask.sum())
            else:  # e.g. an encoder-decoder's decoder layers, whose length is not the mask's: count every position
                sums[path] += float(sq.sum())
                counts[path] += sq.numel()
        return hook

    handles = [layer.register_forward_hook(make_hook(path)) for path, layer in layers]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current["mask"] = token_mask(batch)
            model(**{k: v for k, v in batch.items() if k not in NOT_INPUTS})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums, counts


def layer_scores(model, batches: Iterable[dict], adapter_name: str = "default") -> dict[str, float]:
    """{layer path: g_l}, g_l = mean over the batches' real token positions x of ||ΔW_l x||^2 = ||s B_l A_l x||^2,
    the squared L2 norm of what layer l's LoRA branch adds to its output (eval mode, so without dropout).
    `batches`: dicts of model inputs (input_ids, attention_mask, ...; `labels` and `seq_lens` are ignored); padding
    positions (attention_mask 0) do not count. Computed from the layer's own A, B and scaling on its actual input."""
    sums, counts = _score_sums(model, batches, adapter_name)
    if not any(counts.values()):
        raise ValueError("layer_scores got no positions: `batches` was empty (or all padding). Pass a few batches "
                         "of model inputs, e.g. tokenizer(texts, return_tensors='pt', padding=True).")
    return {p: sums[p] / counts[p] for p in sums}


def importance_table(scores: dict[str, float], threshold: float = 0.9, top_n: int | None = None) -> list[dict]:
    """Rows sorted by importance, descending (ties keep the given order), one per layer:
    {"rank", "layer", "score" (g_l), "importance" (I_l = g_l / Σ g), "cumulative" (Σ of I down to this row),
    "kept"}. Kept: the first `top_n` rows when top_n is given, else the shortest prefix whose cumulative importance
    reaches `threshold` (0 < threshold <= 1)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r} is not valid; it is a share of the total importance, in (0, 1].")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise ValueError(f"top_n={top_n!r} is not valid; it is how many layers to keep, an integer >= 1.")
    bad = {p: s for p, s in scores.items() if not (math.isfinite(s) and s >= 0)}
    if bad:
        raise ValueError(f"Layer scores must be finite and >= 0; got {bad}. A NaN/inf score means the adapter "
                         "diverged in phase 1: lower train.lr.")
    total = sum(scores.values())
    if not total > 0:
        raise ValueError(
            f"Every layer's LoRA output was zero on the sample ({len(scores)} layers, all g_l = 0), so there is "
            "nothing to rank: B is still at its zero init. Train the adapter before scoring it (in peftlab train: a "
            "larger sample_ratio or sample_steps, or a larger train.lr).")
    order = sorted(scores, key=lambda p: scores[p], reverse=True)  # stable, also with reverse=True
    if top_n is not None:
        n_keep = min(top_n, len(order))
    else:
        cumulative, n_keep = 0.0, len(order)
        for i, path in enumerate(order):
            cumulative += scores[path] / total
            if cumulative >= threshold - TOLERANCE:
                n_keep = i + 1
                break
    rows, cumulative = [], 0.0
    for i, path in enumerate(order):
        cumulative += scores[path] / total
        rows.append({"rank": i + 1, "layer": path, "score": scores[path], "importance": scores[path] / total,
                     "cumulative": cumulative, "kept": i < n_keep})
    return rows


def select_layers(model, batches: Iterable[dict], threshold: float = 0.9, top_n: int | None = None,
                  adapter_name: str = "default") -> list[dict]:
    """`importance_table(layer_scores(model, batches, adapter_name), threshold, top_n)`: score the adapter's layers
    on the batches and mark the ones to keep. Train the adapter a little first (phase 1): at LoRA's init B = 0 and
    every score is 0."""
    return importance_table(layer_scores(model, batches, adapter_name), threshold, top_n)


def share_layers(model, keep: Iterable[str], adapter_name: str = "default") -> dict[str, list[str]]:
    """Give every layer of the adapter not in `keep` the A, B pair of its group, and return the groups as
    {path of the layer whose pair they use: [member paths, model order]}.

    Groups: same module name (last part of the path: q_proj, v_proj, ...), same A and B shapes, same scaling, dtype
    and device; the pair is the group's first layer's (its current values). The members' `lora_A[adapter]` and
    `lora_B[adapter]` then hold the same nn.Linear modules, so one set of tensors trains, with the gradients of all
    members adding up in it. `adapter_tensors` still lists the pair under every member's keys (so files are plain
    LoRA files with copies); build the optimizer after sharing (the replaced tensors are no longer in the model)."""
    layers = lora_linears(model, adapter_name)
    paths = [p for p, _ in layers]
    keep = list(keep)
    unknown = [k for k in keep if k not in paths]
    if unknown:
        raise ValueError(f"share_layers: {unknown[:3]} {'is' if len(unknown) == 1 else 'are'} not a layer of adapter "
                         f"{adapter_name!r}; its layers are e.g. {paths[:3]} (the `layer` column of importance_table).")
    merged = [p for p, m in layers if adapter_name in m.merged_adapters]
    if merged:
        raise ValueError(f"Adapter {adapter_name!r} is merged into {len(merged)} base layers (e.g. {merged[0]!r}); "
                         "sharing would change what is merged. Call model.unmerge_adapter() first.")
    if len({id(m.lora_A[adapter_name]) for _, m in layers}) < len(layers):
        raise ValueError(f"Adapter {adapter_name!r} already shares pairs between layers (share_layers ran before); "
                         "build a fresh model to select again.")
    groups: dict[tuple, list[tuple[str, LoraLinear]]] = {}
    for path, layer in layers:
        if path in keep:
            continue
        A, B = layer.lora_pair(adapter_name)
        key = (path.rsplit(".", 1)[-1], tuple(A.shape), tuple(B.shape), layer.scaling[adapter_name], A.dtype, A.device)
        groups.setdefault(key, []).append((path, layer))
    out = {}
    for members in groups.values():
        owner_path, owner = members[0]
        for _, layer in members[1:]:
            layer.lora_A[adapter_name] = owner.lora_A[adapter_name]
            layer.lora_B[adapter_name] = owner.lora_B[adapter_name]
        out[owner_path] = [p for p, _ in members]
    return out


# ---- the `prepare` hook: phase 1, selection, sharing, inside `peftlab train` -----------------------------------------

def _unique_numel(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() for t in {id(t): t for t in tensors}.values())


def prepare(model, adapter_name: str, run) -> str | None:
    """Method.prepare for lora_drop (see peftlab/core/method.py and the package docstring): phase 1 on a sample,
    the importance table, back to the pre-phase-1 values, sharing; prints and saves the table and returns it as a
    model-card section."""
    config = model.peft_config[adapter_name]
    if config.inference_mode:  # a frozen adapter does not train: nothing to select for
        return None
    layers = lora_linears(model, adapter_name)
    gb = run.global_batch
    if config.sample_steps is not None:
        steps = config.sample_steps
        n_rows = min(run.train_rows, steps * gb)
    else:
        n_rows = min(run.train_rows, max(gb, round(config.sample_ratio * run.train_rows)))
        steps = n_rows // gb  # one pass; the Trainer guarantees train_rows >= one global batch, so >= 1
    rows = run.sample_rows(n_rows)
    start = {k: t.detach().clone() for k, t in model.adapter_tensors(adapter_name).items()}
    plain_trainable = _unique_numel(model.trainable_tensors(adapter_name).values())

    run.log(f"LoRA-drop phase 1: plain LoRA on all {len(layers)} adapted layers, {steps} steps on {n_rows} of "
            f"{run.train_rows} training rows")
    losses = run.train(steps, rows)
    sums, counts = _score_sums(model, run.batches(rows), adapter_name)
    scores = {p: sums[p] / max(counts[p], 1) for p in sums}
    table = importance_table(scores, config.threshold, config.top_n)

    # Phase 2 starts from the values phase 1 started from (the paper discards phase 1's weights: it only measures).
    with torch.no_grad():
        for key, tensor in model.adapter_tensors(adapter_name).items():
            tensor.copy_(start[key])
    groups = share_layers(model, [row["layer"] for row in table if row["kept"]], adapter_name)
    owner_of = {member: owner for owner, members in groups.items() for member in members}
    size_of = {owner: len(members) for owner, members in groups.items()}
    for row in table:
        row["shares_pair_of"] = owner_of.get(row["layer"])
        row["group_size"] = size_of.get(owner_of.get(row["layer"]), 1)
    report = {
        "adapter": adapter_name,
        "rule": (f"top_n={config.top_n}" if config.top_n is not None else f"threshold={config.threshold}"),
        "phase1": {"rows": n_rows, "of_rows": run.train_rows, "steps": steps, "losses": losses,
                   "positions": max(counts.values())},
        "layers": table,
        "groups": groups,
        "kept": sum(row["kept"] for row in table),
        "trainable_params": _unique_numel(model.trainable_tensors(adapter_name).values()),
        "trainable_params_plain_lora": plain_trainable,
        "file_params": sum(t.numel() for t in model.adapter_tensors(adapter_name).values()),
    }
    path = run.write_json(IMPORTANCE_FILE, report)
    run.log(format_table(report) + f"\nsaved to {path}")
    return format_markdown(report)


def _adapter_cell(row: dict) -> str:
    if row["kept"]:
        return "own"
    leaf = row["layer"].rsplit(".", 1)[-1]
    if row["group_size"] == 1:
        return f"shared: alone in its {leaf} group (no other non-kept {leaf} to share with)"
    return f"shared: {leaf} group of {row['group_size']} (pair of {row['shares_pair_of']})"


def _summary(report: dict) -> str:
    p1 = report["phase1"]
    loss = f"loss {p1['losses'][0]:.4f} -> {p1['losses'][-1]:.4f}" if p1["losses"] else "no steps"
    return (f"phase 1: {p1['steps']} steps on {p1['rows']} of {p1['of_rows']} training rows ({loss}); scores are the "
            f"mean ||ΔW x||^2 over {p1['positions']:,} token positions of those rows, importance = score / sum. "
            f"Kept {report['kept']} of {len(report['layers'])} layers ({report['rule']}); the other layers share one "
            f"pair per group. Trainable adapter parameters {report['trainable_params']:,} (plain LoRA: "
            f"{report['trainable_params_plain_lora']:,}); the file stores {report['file_params']:,}: it is a plain "
            "LoRA file, each sharing layer's keys holding a copy of its group's pair.")


def format_table(report: dict) -> str:
    """The importance table as aligned text (what the training run prints)."""
    width = max(len(row["layer"]) for row in report["layers"])
    lines = [f"LoRA-drop layer importance ({report['adapter']})",
             f"{'rank':>4}  {'layer':<{width}}  {'score':>10}  {'importance':>10}  {'cumulative':>10}  adapter"]
    for row in report["layers"]:
        lines.append(f"{row['rank']:>4}  {row['layer']:<{width}}  {row['score']:>10.3e}  {row['importance']:>10.4f}  "
                     f"{row['cumulative']:>10.4f}  {_adapter_cell(row)}")
    return "\n".join(lines + [_summary(report)])


def format_markdown(report: dict) -> str:
    """The importance table as a model-card section."""
    lines = ["## LoRA-drop layer selection", "", _summary(report), "",
             "| rank | layer | score | importance | cumulative | adapter |", "|---|---|---|---|---|---|"]
    for row in report["layers"]:
        lines.append(f"| {row['rank']} | `{row['layer']}` | {row['score']:.3e} | {row['importance']:.4f} | "
                     f"{row['cumulative']:.4f} | {_adapter_cell(row)} |")
    return "\n".join(lines)


__all__ = ["IMPORTANCE_FILE", "format_markdown", "format_table", "importance_table", "layer_scores", "lora_linears",
           "prepare", "select_layers", "share_layers", "token_mask"]
