"""The model card (README.md) written beside what a run made, and the metrics table in it: one writer for every way a
run is made (the training loop's adapters, PPO's policy, the methods that take over a run through `Method.run`).

A card is, top to bottom:
    front matter      library_name, base_model, tags [peftlab, <method>, <task>, ...]
    # title           what the folder is
    intro + code      how to load it (PEFT's PeftModel.from_pretrained for weight adapters; the method's own API
                      for folders that are not weight adapters)
    ## Data          the data files and row counts (left out where the run has no data section, e.g. PPO prompts)
    Parameters: ...   PEFT's print_trainable_parameters figures, where the result has them
    ## Results        the heading's figures, an optional sentence, the table: | metric | before | after |
    ## <settings>     the options as used (yaml of method + train for the loop; the method's options as JSON ...)
    notes             Markdown sections a method added (Method.prepare's notes, a Method.run's description)
"""

from __future__ import annotations

import json
import os

import yaml

from ..core.model import trainable_parameters_line
from ..io.atomic import atomic_write_text

PEFT_USAGE = """from peftlab import PeftModel   # or: from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "{adapter_dir}")"""


def metrics_table(before: dict | None, after: dict, labels: tuple[str, str] = ("before", "after")) -> str:
    """| metric | before | after | in Markdown: one row per float metric of `after` (4 decimals), '-' where `before`
    lacks it (no evaluation before training, or a metric only the end has)."""
    before = before or {}
    rows = [f"| metric | {labels[0]} | {labels[1]} |", "|---|---|---|"]
    for key, value in after.items():
        if isinstance(value, float):
            was = f"{before[key]:.4f}" if key in before else "-"
            rows.append(f"| {key} | {was} | {value:.4f} |")
    return "\n".join(rows)


def format_before_after(result: dict) -> str:
    """The metrics table of a run's result (what `peftlab train` prints at the end)."""
    return metrics_table(result["before"], result["after"])


def _parameters_line(result: dict) -> str:
    """PEFT's print_trainable_parameters figures (what `peftlab train` printed at the start), or nothing for a run
    that reports none."""
    if not result.get("all_params"):
        return ""
    return f"Parameters: {trainable_parameters_line(result['trainable_params'], result['all_params'])}\n\n"


def _data_section(run, result: dict) -> str:
    data = run.to_dict()["data"]
    evals = data.get("eval_file") or f"{data['eval_fraction']:.0%} of train, seed {data['seed']}"
    rows = json.dumps(result.get("data", {}).get("counts", result.get("data", {})), default=str)[:600]
    return f"## Data\n- train: `{data['train_file']}`; eval: `{evals}`\n- rows: {rows}\n\n"


def write_model_card(adapter_dir: str, run, result: dict, *, title: str | None = None, tags: tuple[str, ...] = (),
                     intro: str = "Trained with peftlab. Load it with peftlab or Hugging Face PEFT:",
                     usage: str | None = None, data: bool = True, results: str | None = None,
                     results_intro: str = "", settings: tuple[str, str, str] | None = None,
                     notes: list[str] | None = None) -> str:
    """Write adapter_dir/README.md (atomically) and return its path. The defaults describe a weight adapter trained
    by the loop; each keyword replaces one part (see the module docstring):
        title     the '# ' line (default '<method> adapter for <model> (<task>)'); tags: more front-matter tags
        intro     the sentence before the code block; usage: the code (default: PEFT's PeftModel.from_pretrained)
        data      whether the Data section is written (run.data must then be set)
        results   the Results heading (default: steps, seconds, tokens/s); results_intro: a paragraph before the
                  table, whose columns are result's 'before_label' / 'after_label' (default before / after)
        settings  (heading, fence language, body) of the options block (default: yaml of method + train)
        notes     Markdown sections appended at the end (default: result['method_notes'])"""
    config = run.to_dict()
    title = title or f"{run.method_name} adapter for {run.model} ({run.task})"
    usage = usage if usage is not None else PEFT_USAGE.format(adapter_dir=adapter_dir)
    results = results or (f"Results ({result['steps']} optimizer steps, {result['train_seconds']:.0f} s, "
                          f"{result['tokens_per_s']:.0f} tokens/s)")
    if settings is None:
        settings = ("Hyper-parameters", "yaml",
                    yaml.safe_dump({"method": config["method"], "train": config["train"]}, sort_keys=False))
    table = metrics_table(result.get("before"), result["after"],
                          (result.get("before_label", "before"), result.get("after_label", "after")))
    data_part = _data_section(run, result) if data else ""
    results_intro = results_intro.strip() + "\n\n" if results_intro.strip() else ""
    text = f"""---
library_name: peftlab
base_model: {run.model}
tags: [{', '.join(("peftlab", run.method_name, run.task, *tags))}]
---

# {title}

{intro.strip()}

```python
{usage.strip()}
```

{data_part}{_parameters_line(result)}## {results}

{results_intro}{table}

## {settings[0]}

```{settings[1]}
{settings[2].strip()}
```
"""
    if notes is None:
        notes = result.get("method_notes") or []
    for note in notes:
        text += "\n" + note.strip() + "\n"
    path = os.path.join(adapter_dir, "README.md")
    atomic_write_text(path, text)
    return path


__all__ = ["format_before_after", "metrics_table", "write_model_card"]
