"""`train.report_to`: where a run's metrics go besides metrics.jsonl, through Accelerate's trackers.

    train: {report_to: [tensorboard, wandb, mlflow]}

- tensorboard (the default, as `train.tensorboard: true` has always meant): event files in output_dir/tb.
- wandb: online when W&B has an API key (WANDB_API_KEY or `wandb login`), else offline into output_dir/wandb
  (`wandb sync output_dir/wandb/offline-run-*` uploads it later); WANDB_MODE, when set, decides. Project
  WANDB_PROJECT or "peftlab", run name the output folder's name.
- mlflow: MLFLOW_TRACKING_URI when set, else a local file store in output_dir/mlruns (`mlflow ui
  --backend-store-uri output_dir/mlruns`). Experiment MLFLOW_EXPERIMENT_NAME or "peftlab".

How `report_to` and the older `train.tensorboard` flag relate: report_to unset (null) means [tensorboard] when
train.tensorboard is true (the default) and [] when it is false; a report_to list is exactly the trackers used
(`report_to: []` or `[none]`: none). tensorboard: false beside a report_to that lists tensorboard is refused.

wandb and mlflow are optional (`pip install 'peftlab[trackers]'`); asking for one that is not installed fails with
one line naming the extra when training starts (not when a config is read: evaluating a finished run needs none).
The run config goes to each tracker as its parameters (flattened to `section.field` keys); every metrics.jsonl record is logged as `split/key` at its step, the names TensorBoard
always had (train/loss, eval/accuracy, ...).

Nothing here imports torch or accelerate at module level: train/config.py reads TRACKERS and check_report_to.
"""

from __future__ import annotations

import importlib.util
import math
import netrc
import os

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""report_to name -> the module it needs."""

EXTRA = "pip install 'peftlab[trackers]'"


def check_report_to(report_to, tensorboard: bool) -> list[str] | None:
    """The validated report_to (None stays None), or a ValueError with one line saying what to write."""
    if report_to is None:
        return None
    names = [report_to] if isinstance(report_to, str) else report_to
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"train.report_to={report_to!r} is not valid; give a list such as [tensorboard, wandb] "
                         f"(choices: {', '.join(TRACKERS)}; [] for none).")
    names = [n for n in dict.fromkeys(names) if n != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], list(TRACKERS), n=1, cutoff=0.5)
        raise ValueError(f"train.report_to lists {unknown[0]!r}, which is not a tracker here"
                         f"{f' (did you mean {near[0]}?)' if near else ''}; choices: {', '.join(TRACKERS)}.")
    if "tensorboard" in names and not tensorboard:
        raise ValueError("train.tensorboard is false but train.report_to lists tensorboard; drop one of them "
                         "(report_to, when set, is the whole list: tensorboard is the older switch).")
    return names


def check_installed(names: list[str]) -> None:
    """At the start of training (not when a config is read: `peftlab eval` of a finished run needs no tracker)."""
    from ..core.config import ConfigError

    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"train.report_to lists {name}, but the {TRACKERS[name]} package is not installed. "
                              f"Install the trackers extra: `{EXTRA}` (or `pip install {TRACKERS[name]}`).")


def trackers_for(report_to: list[str] | None, tensorboard: bool) -> list[str]:
    """The trackers a run uses (see the module docstring)."""
    if report_to is not None:
        return list(report_to)
    # unset report_to keeps train.tensorboard's old behaviour: with TensorBoard not installed, no event files
    return ["tensorboard"] if tensorboard and importlib.util.find_spec("tensorboard") is not None else []


def _flat(config: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists and None as text (trackers take scalars)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def _wandb_mode() -> str:
    """WANDB_MODE when set; online when an API key is at hand (env or ~/.netrc, where `wandb login` writes it)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].rstrip("/")
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"


_OUR_MLFLOW_URIS: set[str] = set()
"""MLflow tracking URIs this process set for a run's local store: a later run treats them as unset, not as the user's
(mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which a run killed before close() leaves behind)."""


class RunTrackers:
    """Wraps a metrics writer (`write(record)`, `close()`; the loop's metrics.jsonl logger) and sends every record
    to the run's Accelerate trackers too. Construct on the main process only (the loop's logger already is)."""

    def __init__(self, run, metrics, log=print) -> None:
        from accelerate import PartialState
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        PartialState()  # Accelerate's trackers log through its logger, which needs the state (set up by the loop)
        cfg = run.train
        self.metrics, self.trackers = metrics, []
        self.exported_uri: str | None = None
        out = os.path.abspath(cfg.output_dir)
        name = os.path.basename(out.rstrip(os.sep)) or "run"
        chosen = trackers_for(getattr(cfg, "report_to", None), cfg.tensorboard)
        check_installed(chosen)
        for tracker in chosen:
            if tracker == "tensorboard":
                made = TensorBoardTracker("tb", out)  # event files in output_dir/tb, where they always were
            elif tracker == "wandb":
                mode = _wandb_mode()
                made = WandBTracker(os.environ.get("WANDB_PROJECT", "peftlab"), name=name, dir=out, mode=mode)
                if mode == "offline":
                    log(f"wandb: offline (no API key or WANDB_MODE=offline); the run is written to {out}/wandb, "
                        f"`wandb sync {out}/wandb/offline-run-*` uploads it")
            else:
                import mlflow

                if os.environ.get("MLFLOW_TRACKING_URI", "") in ("", *_OUR_MLFLOW_URIS):  # not the user's own
                    # MLflow 3 keeps the file store but refuses it unless asked; a local folder is the point here
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                    uri = "file://" + os.path.join(out, "mlruns")
                    _OUR_MLFLOW_URIS.add(uri)
                    mlflow.set_tracking_uri(uri)  # MLflow 3 also exports it as MLFLOW_TRACKING_URI: close() undoes
                    self.exported_uri = uri
                made = MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", "peftlab"), run_name=name)
            made.start()
            self.trackers.append(made)
        params = _flat(run.to_dict())
        for made in self.trackers:
            made.store_init_configuration(params)

    def write(self, record: dict) -> None:
        self.metrics.write(record)
        values = {f"{record['split']}/{k}": v for k, v in record.items() if k not in ("step", "split")
                  and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for made in self.trackers:
            made.log(values, step=record["step"])

    def close(self) -> None:
        self.metrics.close()
        for made in self.trackers:
            made.finish()
        if self.exported_uri is not None and os.environ.get("MLFLOW_TRACKING_URI") == self.exported_uri:
            del os.environ["MLFLOW_TRACKING_URI"]  # the next run in this process gets its own store, not this one


__all__ = ["EXTRA", "RunTrackers", "TRACKERS", "check_installed", "check_report_to", "trackers_for"]
