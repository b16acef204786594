"""What the baselines that take over a `peftlab train` run (`Method.run`: features, icl) share: reading the
classification rows, the device and precision, and writing the run folder the training loop writes:

    output_dir/metrics.jsonl      eval records as the loop writes them: {"step": 0, "split": "eval", "loss": ...,
                                  "accuracy": ..., "macro_f1": ...} plus "stage" (which evaluation it is)
    output_dir/run_config.yaml    the run config
    output_dir/adapter/           the method's files and README.md, a model card: how to load it (the method's own
                                  Python API, since these folders are not weight adapters), data, results, options;
                                  written whole by one folder swap (io/atomic.py): a kill leaves the old folder or
                                  the new one, never a new probe beside an old config

These methods use the training layer's helpers (data loading, model loading, precision), which the gradient methods
never import: a `Method.run` does the work of the training loop, so it sits beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection

import torch
import yaml

from ..core.config import ConfigError
from ..io.atomic import atomic_folder, atomic_write_text


def classify_splits(run, method_name: str):
    """The run's checked rows (peftlab.data.Splits) for a method that only classifies."""
    from ..data import load_splits
    from ..train.sources import resolve_shipped

    if run.task != "classify":
        raise ConfigError(f"method {method_name} classifies texts: it needs `task: classify` (rows with text and "
                          f"label), but the run says task: {run.task}. Use a gradient method (e.g. lora) for "
                          f"{run.task}, or set task: classify.")
    splits = load_splits(resolve_shipped(run.data), "classify")
    if not splits.eval:
        raise ConfigError(f"method {method_name} has nothing to report without eval rows: set data.eval_fraction "
                          f"> 0 or give data.eval_file.")
    return splits


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for train.precision (auto: as the loop resolves it), None for fp32."""
    from ..train.loop import resolve_precision

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def method_options(config) -> dict:
    """The method's own options as used (its fields beyond the adapter fields every method shares)."""
    import dataclasses

    from ..core.config import AdapterConfig

    shared = {f.name for f in dataclasses.fields(AdapterConfig)} - {"base_model_name_or_path"}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in shared}


def eval_record(metrics: dict, stage: str) -> dict:
    return {"step": 0, "split": "eval", **metrics, "stage": stage}


def save_folder(folder: str, write_files: Callable[[str], None], owned: Collection[str]) -> None:
    """A saved features/icl folder, written whole (io/atomic.py's folder swap): a kill leaves the old folder or the
    new one. `write_files(staging)` writes the method's files. Other entries of the old folder (a user's notes) are
    carried over; those in `owned` (every file the format can hold) are not: a k=0 icl save must not keep an older
    save's demonstrations."""
    with atomic_folder(folder, keep_existing=lambda name: name not in owned) as staging:
        write_files(staging)


def write_run_folder(run, config, result: dict, records: list[dict], usage: str, notes: list[str],
                     write_files: Callable[[str], None]) -> None:
    """metrics.jsonl (appended, NaN as null, as the loop does), the adapter folder (`write_files` + the model card,
    one folder swap) and run_config.yaml."""
    from ..train.loop import _MetricsLogger

    out = run.train.output_dir
    os.makedirs(out, exist_ok=True)
    metrics = _MetricsLogger(out, tensorboard=False)
    for rec in records:
        metrics.write(rec)
    metrics.close()
    with atomic_folder(result["adapter_dir"]) as staging:  # the method's files and the card that describes them
        write_files(staging)
        write_card(staging, run, config, result, usage, notes)
    atomic_write_text(os.path.join(out, "run_config.yaml"), yaml.safe_dump(run.to_dict(), sort_keys=False))


def write_card(adapter_dir: str, run, config, result: dict, usage: str, notes: list[str]) -> str:
    """README.md: how to load, data, results, and `config` (the method's config as used, defaults filled in)."""
    options = json.dumps({"name": run.method_name, **method_options(config)}, indent=2, default=str)
    before, after = result.get("before") or {}, result["after"]
    rows = "\n".join(f"| {k} | {before[k]:.4f} | {v:.4f} |" if k in before else f"| {k} | - | {v:.4f} |"
                     for k, v in after.items() if isinstance(v, float))
    data = run.to_dict()["data"]
    evals = data.get("eval_file") or f"{data['eval_fraction']:.0%} of train, seed {data['seed']}"
    counts = result.get("data", {}).get("counts", {})
    text = f"""---
library_name: peftlab
base_model: {run.model}
tags: [peftlab, {run.method_name}, {run.task}]
---

# {run.method_name} for {run.model} ({run.task})

Made with `peftlab train` ({run.method_name}: no gradient steps; the base model stays frozen). This folder is not a
weight adapter: PEFT's `PeftModel.from_pretrained` cannot load it. Use:

```python
{usage.strip()}
```

## Data
- train: `{data['train_file']}`; eval: `{evals}`
- rows: {json.dumps(counts, default=str)[:600]}

## Results ({result['train_seconds']:.1f} s; trainable parameters {result['trainable_params']:,})

| metric | {result.get('before_label', 'before')} | {result.get('after_label', 'after')} |
|---|---|---|
{rows}

## Options (as used)

```json
{options}
```
"""
    for note in notes:
        text += "\n" + note.strip() + "\n"
    os.makedirs(adapter_dir, exist_ok=True)
    path = os.path.join(adapter_dir, "README.md")
    atomic_write_text(path, text)
    return path


def read_saved_config(folder: str, config_cls, what: str):
    """The config of a folder a `Method.run` baseline saved (`what`: "features", "icl"), checked to be that method's:
    one reader for every such `load`, with one set of errors."""
    from ..core.config import CONFIG_NAME

    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: it is not a saved {what} folder.")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if data.get("peft_type") != config_cls.peft_type:
        raise ConfigError(f"{path} says peft_type={data.get('peft_type')!r}, not {config_cls.peft_type!r}; load it "
                          f"with the method that wrote it (PeftModel.from_pretrained for weight adapters).")
    return config_cls.from_dict(data, source=path)
