"""What a method that takes over a `peftlab train` run gets from the training layer (`Method.run(run)`, for the
methods that train no parameter by gradient steps: features + logistic regression, in-context learning).

`train()` builds a `MethodRun` and hands it down, as the loop hands `PrepareRun` to `Method.prepare`: the method
reads the run and its rows through it, does its work, and hands its results back up through `write_outputs`, which
writes the run folder the training loop writes:

    output_dir/metrics.jsonl      eval records as the loop writes them ({"step": 0, "split": "eval", "loss": ..., ...}
                                  plus "stage": which evaluation it is), appended, NaN as null (metrics_log.py)
    output_dir/run_config.yaml    the run config
    output_dir/adapter/           the method's files and README.md, the model card (model_card.py: how to load it with
                                  the method's own Python API, since these folders are not weight adapters; data,
                                  results, options), written whole by one folder swap (io/atomic.py): a kill leaves
                                  the old folder or the new one, never a new probe beside an old config
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import yaml

from ..core.config import ConfigError
from ..data import Splits, load_splits
from ..io.atomic import atomic_folder, atomic_write_text
from .metrics_log import MetricsLogger
from .trackers import RunTrackers
from .model_card import write_model_card
from .optim import autocast_dtype
from .sources import resolve_shipped


class MethodRun:
    """The run as a `Method.run` hook sees it (see the module docstring)."""

    def __init__(self, run, log=print) -> None:
        self.run = run
        """The RunConfig (model, task, method, data, train sections)."""
        self.log = log
        self.adapter_dir: str = os.path.join(run.train.output_dir, "adapter")
        """Where the method's folder goes (written by write_outputs)."""
        self.base_dtype: str = run.base_dtype
        """The dtype to load the frozen base in (model.dtype, fp32 under train.precision=fp32 when auto)."""
        self.autocast_dtype = autocast_dtype(run.train.precision)
        """torch dtype to compute the base's forwards under (train.precision; None: fp32, no autocast)."""

    def classify_splits(self, method_name: str) -> Splits:
        """The run's checked rows (train, eval, labels, label2id, report) for a method that only classifies: the run
        must be `task: classify` and have eval rows to report on."""
        run = self.run
        if run.task != "classify":
            raise ConfigError(f"method {method_name} classifies texts: it needs `task: classify` (rows with text and "
                              f"label), but the run says task: {run.task}. Use a gradient method (e.g. lora) for "
                              f"{run.task}, or set task: classify.")
        splits = load_splits(resolve_shipped(run.data), "classify")
        if not splits.eval:
            raise ConfigError(f"method {method_name} has nothing to report without eval rows: set data.eval_fraction "
                              f"> 0 or give data.eval_file.")
        return splits

    def write_outputs(self, result: dict, records: list[dict], write_files: Callable[[str], None], usage: str,
                      options: dict) -> dict:
        """Write the run folder (module docstring) and return `result`, the dict the training loop returns (before,
        after, steps, train_seconds, tokens_per_s, adapter_dir, data, method_notes, trainable_params, all_params;
        before_label / after_label name the table's columns). `write_files(folder)` writes the method's files,
        `usage` is the Python that loads the folder, `options` the method's options as used (for the card)."""
        run = self.run
        out = run.train.output_dir
        os.makedirs(out, exist_ok=True)
        # metrics.jsonl, and the same records to train.report_to's trackers (TensorBoard by default: trackers.py)
        metrics = RunTrackers(run, MetricsLogger(out, tensorboard=False), self.log)
        for rec in records:
            metrics.write(rec)
        metrics.close()
        with atomic_folder(result["adapter_dir"]) as staging:  # the method's files and the card that describes them
            write_files(staging)
            write_model_card(
                staging, run, result, title=f"{run.method_name} for {run.model} ({run.task})",
                intro=f"Made with `peftlab train` ({run.method_name}: no gradient steps; the base model stays frozen). "
                      "This folder is not a\nweight adapter: PEFT's `PeftModel.from_pretrained` cannot load it. Use:",
                usage=usage, results=f"Results ({result['train_seconds']:.1f} s)",
                settings=("Options (as used)", "json",
                          json.dumps({"name": run.method_name, **options}, indent=2, default=str)))
        atomic_write_text(os.path.join(out, "run_config.yaml"), yaml.safe_dump(run.to_dict(), sort_keys=False))
        return result


__all__ = ["MethodRun"]
