"""The FISH-mask steps as a Python API, and the `prepare` hook that runs them inside `peftlab train`.

    scores = fisher_scores(model, batches)       # {layer path: F (weight's shape)}, F = mean over batches of g^2
    table = select_entries(model, scores, density=0.005)   # keep the top entries; rows: per-layer selected fraction
    table = select(model, batches, density=0.005)           # both in one call

The math is in peftlab/methods/selective/__init__.py. A batch counts as one sample: pass one example per batch
(`PrepareRun.batches(rows, batch_size=1)` in the prepare hook) for the paper's per-example squared gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

from .layer import SelectiveLinear

SELECTION_FILE = "selective_selection.json"

# Batch keys the model's forward does not take (packed rows' per-example lengths); labels stay: the loss needs them.
NOT_MODEL_INPUTS = ("seq_lens",)


def selective_layers(model, adapter_name: str = "default") -> list[tuple[str, SelectiveLinear]]:
    """[(module path, layer)] carrying adapter `adapter_name`, in model order."""
    model._check_known(adapter_name)
    layers = [(p, m) for p, m in model.adapter_layers()
              if isinstance(m, SelectiveLinear) and adapter_name in m.adapter_names]
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} is a {model.method_of(adapter_name).name} adapter with no "
                         "selective layers; fisher_scores / select_entries work on `selective` adapters.")
    return layers


def model_loss(model, batch: dict) -> torch.Tensor:
    """The model's own loss on a batch with `labels` (transformers computes it: cross-entropy of the label for
    sequence classification, mean next-token cross-entropy for causal LMs)."""
    out = model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS})
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(f"The model returned no loss for a batch with keys {sorted(batch)}: Fisher scores need the "
                         "loss's gradient. Pass batches with `labels`, or a loss_fn(model, batch) -> scalar tensor.")
    return loss


@contextlib.contextmanager
def _weights_take_gradients(model, layers):
    """Within the block only the layers' base weights require grad; every flag and .grad is restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for _, layer in layers:
            layer.base_layer.weight.requires_grad_(True)
        yield
    finally:
        for _, layer in layers:
            layer.base_layer.weight.grad = None
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def fisher_scores(model, batches: Iterable[dict], adapter_name: str = "default",
                  loss_fn: Callable[..., torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{layer path: F} with F = (1/N) Σ_n (∂ℓ_n/∂W_eff)^2 (fp32, the weight's stored shape), the empirical Fisher of
    each entry of the layer's effective weight W_eff = W + the adapter's delta, over the N batches, in eval mode (no
    dropout; a bf16/fp16 base under autocast in its dtype). ℓ_n = loss_fn(model, batch) (default: the model's own loss from the batch's `labels`). Memory: one fp32
    accumulator and one gradient per candidate weight while it runs."""
    layers = selective_layers(model, adapter_name)
    sums = {path: torch.zeros(layer.base_layer.weight.shape, dtype=torch.float32,
                              device=layer.base_layer.weight.device) for path, layer in layers}
    n = 0
    modes = [(m, m.training) for m in model.modules()]  # restored one by one: a wrapper's flag need not be its base's
    model.eval()
    # A bf16/fp16 base computes under autocast in its dtype, as the training loop runs it (Accelerate's mixed
    # precision): the fp32 tensors that train beside it (a new head, the values) then meet half-precision activations.
    half = {l.base_layer.weight.dtype for _, l in layers} & {torch.bfloat16, torch.float16}
    device = layers[0][1].base_layer.weight.device
    autocast = torch.autocast(device.type, dtype=half.pop(), enabled=True) if half else contextlib.nullcontext()
    try:
        with _weights_take_gradients(model, layers), torch.enable_grad(), autocast:
            for batch in batches:
                loss = (loss_fn or model_loss)(model, batch)
                if not torch.isfinite(loss):
                    raise ValueError(f"The loss of scoring batch {n} is {float(loss)}; Fisher scores need a finite "
                                     "loss. Check the rows (labels) and the model's dtype.")
                loss.backward()
                for path, layer in layers:
                    weight = layer.base_layer.weight
                    sums[path].add_(weight.grad.float().pow(2))
                    weight.grad = None
                n += 1
    finally:
        for module, mode in modes:
            module.training = mode
    if n == 0:
        raise ValueError("fisher_scores got no batches; pass a few batches of model inputs with labels.")
    return {path: s.div_(n) for path, s in sums.items()}


def _top_positions(scores: dict[str, torch.Tensor], density: float, threshold: float | None,
                   scope: str) -> dict[str, torch.Tensor]:
    """{path: ascending flat indices kept}: entries >= threshold, or the top density fraction (global or per tensor,
    at least one entry per ranking)."""
    if threshold is not None:
        return {p: torch.nonzero(s.view(-1) >= threshold).view(-1) for p, s in scores.items()}
    if scope == "per_tensor":
        return {p: torch.topk(s.view(-1), max(1, round(density * s.numel()))).indices.sort().values
                for p, s in scores.items()}
    flat = torch.cat([s.view(-1) for s in scores.values()])
    top = torch.topk(flat, max(1, round(density * flat.numel()))).indices.sort().values
    del flat
    out, start = {}, 0
    for path, s in scores.items():
        lo, hi = torch.searchsorted(top, torch.tensor([start, start + s.numel()], device=top.device)).tolist()
        out[path] = top[lo:hi] - start
        start += s.numel()
    return out


def select_entries(model, scores: dict[str, torch.Tensor], adapter_name: str = "default", density: float = 0.005,
                   threshold: float | None = None, scope: str = "global") -> list[dict]:
    """Make the adapter's delta the kept entries of `scores` (see `_top_positions`). An entry kept again keeps its
    trained value; a new one starts at 0; one no longer kept drops out (its trained change is discarded: the weight
    is W's own there again). Returns one row per layer, in model order: layer, shape, entries, selected, fraction,
    kept_values (selected entries that were already selected), fisher_share (the share of the layer's total score
    that the selected entries hold)."""
    layers = dict(selective_layers(model, adapter_name))
    unknown = sorted(set(scores) - set(layers))
    if unknown:
        raise ValueError(f"scores name layers adapter {adapter_name!r} does not have: {unknown[:3]}. Pass the dict "
                         "fisher_scores returned for this model.")
    kept = _top_positions(scores, density, threshold, scope)
    rows = []
    for path, new in kept.items():
        layer, s = layers[path], scores[path]
        old_idx = layer.selective_indices[adapter_name].long()
        old_val = layer.selective_values[adapter_name].detach()
        new = new.to(old_idx.device)
        values = torch.zeros(len(new), dtype=old_val.dtype, device=old_val.device)
        if len(old_idx) and len(new):
            pos = torch.searchsorted(old_idx, new).clamp(max=len(old_idx) - 1)
            hit = old_idx[pos] == new
            values[hit] = old_val[pos[hit]]
            again = int(hit.sum())
        else:
            again = 0
        layer.set_selection(adapter_name, new, values)
        total = float(s.sum())
        rows.append({"layer": path, "shape": list(layer.base_layer.weight.shape), "entries": s.numel(),
                     "selected": len(new), "fraction": len(new) / s.numel(), "kept_values": again,
                     "fisher_share": float(s.view(-1)[new].sum()) / total if total > 0 else 0.0})
    return rows


def select(model, batches: Iterable[dict], adapter_name: str = "default", density: float = 0.005,
           threshold: float | None = None, scope: str = "global",
           loss_fn: Callable[..., torch.Tensor] | None = None) -> list[dict]:
    """fisher_scores then select_entries: score every candidate entry on `batches` and keep the top ones."""
    scores = fisher_scores(model, batches, adapter_name, loss_fn)
    return select_entries(model, scores, adapter_name, density, threshold, scope)


def _cutoff(scores: dict[str, torch.Tensor], model, adapter_name: str) -> dict[str, float]:
    """The smallest selected score and the largest score overall (what a `threshold` would be compared with)."""
    layers = dict(selective_layers(model, adapter_name))
    chosen = [scores[p].view(-1)[layers[p].selective_indices[adapter_name].long()] for p in scores]
    chosen = [c for c in chosen if len(c)]
    return {"min_selected_score": float(min(c.min() for c in chosen)) if chosen else 0.0,
            "max_score": float(max(s.max() for s in scores.values()))}


def prepare(model, adapter_name: str, run) -> str:
    """`Method.prepare` for selective: `rounds` x (score num_samples rows one by one, select; train round_steps
    steps between rounds), then print/save the selected fraction per layer (output_dir/selective_selection.json)."""
    config = model.peft_config[adapter_name]
    model.to(run.device)
    n = min(config.num_samples, run.train_rows)
    rounds = []
    for r in range(config.rounds):
        rows = run.sample_rows(n, seed=run.seed + r)  # a new sample each round
        scores = fisher_scores(model, run.batches(rows, batch_size=1), adapter_name)
        table = select_entries(model, scores, adapter_name, config.density, config.threshold, config.scope)
        info = {"round": r + 1, "rows": n, **_cutoff(scores, model, adapter_name), "layers": table}
        del scores
        if r < config.rounds - 1:
            run.log(f"selective round {r + 1}: {sum(t['selected'] for t in table):,} entries selected; training "
                    f"{config.round_steps} steps before scoring again")
            info["losses"] = run.train(config.round_steps, list(range(run.train_rows)))
        rounds.append(info)
    last = rounds[-1]["layers"]
    report = {
        "adapter": adapter_name,
        "rule": (f"threshold={config.threshold}" if config.threshold is not None
                 else f"density={config.density} ({config.scope})"),
        "rounds": rounds,
        "entries": sum(t["entries"] for t in last),
        "selected": sum(t["selected"] for t in last),
        "all_params": sum(p.numel() for p in model.parameters()),
    }
    path = run.write_json(SELECTION_FILE, report)
    run.log(format_table(report) + f"\nsaved to {path}")
    return format_markdown(report)


def _summary(report: dict) -> str:
    last = report["rounds"][-1]
    return (f"{len(report['rounds'])} round(s); Fisher scores = mean squared per-example gradient over "
            f"{last['rows']} training rows. Selected {report['selected']:,} of {report['entries']:,} candidate entries "
            f"({100 * report['selected'] / max(report['entries'], 1):.3f}%; "
            f"{100 * report['selected'] / max(report['all_params'], 1):.3f}% of the model's parameters), rule "
            f"{report['rule']}; smallest selected score {last['min_selected_score']:.3e}, largest score "
            f"{last['max_score']:.3e}.")


def format_table(report: dict) -> str:
    """The last round's selection as aligned text (what the training run prints)."""
    rows = report["rounds"][-1]["layers"]
    width = max(len(row["layer"]) for row in rows)
    lines = [f"Selective fine-tuning: selected entries per layer ({report['adapter']})",
             f"{'layer':<{width}}  {'shape':>12}  {'selected':>9}  {'fraction':>9}  {'fisher share':>12}"]
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        lines.append(f"{row['layer']:<{width}}  {shape:>12}  {row['selected']:>9,}  {row['fraction']:>9.4%}  "
                     f"{row['fisher_share']:>12.4f}")
    return "\n".join(lines + [_summary(report)])


def format_markdown(report: dict) -> str:
    """The selection as a model-card section."""
    lines = ["## Selective fine-tuning: selected entries", "", _summary(report), "",
             "| layer | shape | selected | fraction | fisher share |", "|---|---|---|---|---|"]
    for row in report["rounds"][-1]["layers"]:
        lines.append(f"| `{row['layer']}` | {'x'.join(map(str, row['shape']))} | {row['selected']:,} | "
                     f"{row['fraction']:.4%} | {row['fisher_share']:.4f} |")
    return "\n".join(lines)


__all__ = ["SELECTION_FILE", "fisher_scores", "format_markdown", "format_table", "model_loss", "prepare", "select",
           "select_entries", "selective_layers"]
