"""The model card written beside a trained adapter: what it is, how it was made, how well it did."""

from __future__ import annotations

import json
import os

import yaml

from ..core.model import trainable_parameters_line
from ..io.atomic import atomic_write_text


def _parameters_line(result: dict) -> str:
    """PEFT's print_trainable_parameters figures (what `peftlab train` printed at the start), or nothing for a method
    that reports none."""
    if not result.get("all_params"):
        return ""
    return f"Parameters: {trainable_parameters_line(result['trainable_params'], result['all_params'])}\n\n"


def write_model_card(adapter_dir: str, run, result: dict) -> str:
    config = run.to_dict()
    before, after = result.get("before") or {}, result["after"]
    metric_rows = "\n".join(
        f"| {k} | {before[k]:.4f} | {v:.4f} |" if k in before else f"| {k} | - | {v:.4f} |"
        for k, v in after.items() if isinstance(v, float))
    data = config["data"]
    params = _parameters_line(result)
    text = f"""---
library_name: peftlab
base_model: {run.model}
tags: [peftlab, {run.method_name}, {run.task}]
---

# {run.method_name} adapter for {run.model} ({run.task})

Trained with peftlab. Load it with peftlab or Hugging Face PEFT:

```python
from peftlab import PeftModel   # or: from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "{adapter_dir}")
```

## Data
- train: `{data['train_file']}`; eval: `{data.get('eval_file') or f"{data['eval_fraction']:.0%} of train, seed {data['seed']}"}`
- rows: {json.dumps(result.get('data', {}).get('counts', result.get('data', {})), default=str)[:600]}

{params}## Results ({result['steps']} optimizer steps, {result['train_seconds']:.0f} s, {result['tokens_per_s']:.0f} tokens/s)

| metric | before | after |
|---|---|---|
{metric_rows}

## Hyper-parameters

```yaml
{yaml.safe_dump({'method': config['method'], 'train': config['train']}, sort_keys=False).strip()}
```
"""
    for note in result.get("method_notes") or []:  # sections a method's `prepare` hook wrote (Method.prepare)
        text += "\n" + note.strip() + "\n"
    path = os.path.join(adapter_dir, "README.md")
    atomic_write_text(path, text)
    return path
