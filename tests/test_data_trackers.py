"""`train.report_to`: a tiny run reports every metrics.jsonl number to TensorBoard, W&B (offline: a local run folder)
and MLflow (a local file store), through Accelerate's trackers; the config refuses what it cannot do in one line.

Each tracker's files are read back with its own reader (TensorBoard's EventAccumulator, W&B's protobuf records,
MLflow's metric files) and compared with metrics.jsonl. A tracker whose package is not installed is skipped
with the extra that installs it.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct

import pytest

from peftlab.core.config import ConfigError
from peftlab.train.trackers import EXTRA, RunTrackers

from .conftest import run_config, sentences, write_jsonl

INSTALLED = [name for name in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(name) is not None]
MISSING = sorted({"tensorboard", "wandb", "mlflow"} - set(INSTALLED))


def _train_losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _tensorboard(out) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "tb"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def _wandb(out) -> tuple[dict[int, float], dict]:
    """History and config of the offline run: the .wandb file is a log of 32 KiB blocks whose records (7-byte header:
    crc, length, type FULL/FIRST/MIDDLE/LAST) hold wandb_internal_pb2.Record messages, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(out, "wandb", "offline-run-*", "*.wandb"))
    data = open(path, "rb").read()
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(pending)
            pending = b""
    history, config = {}, {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                history[items["_step"]] = items["train/loss"]
        elif record.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    return history, config


def _mlflow(out) -> dict[int, float]:
    (path,) = glob.glob(os.path.join(out, "mlruns", "*", "*", "metrics", "train", "loss"))
    rows = [line.split() for line in open(path)]  # "timestamp value step"
    return {int(step): float(value) for _, value, step in rows}


@pytest.mark.skipif(not INSTALLED, reason=f"no tracker installed: {EXTRA}")
def test_every_tracker_gets_every_train_loss(llama_dir, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key: offline
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    from peftlab.train import train

    data = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in sentences(24)])
    out = tmp_path / "run"
    result = train(run_config(llama_dir, "causal_lm", data, out, max_steps=3, tensorboard=True, report_to=INSTALLED),
                   log=lambda *_: None)
    assert result["steps"] == 3
    want = _train_losses(out)
    assert sorted(want) == [1, 2, 3]
    if "tensorboard" in INSTALLED:
        assert _tensorboard(out) == pytest.approx(want, rel=1e-6)  # TensorBoard stores float32
    if "wandb" in INSTALLED:
        history, config = _wandb(out)
        assert history == pytest.approx(want, rel=1e-12)
        assert config["train.max_steps"] == 3 and config["task"] == "causal_lm"
    if "mlflow" in INSTALLED:
        assert _mlflow(out) == pytest.approx(want, rel=1e-12)
    if MISSING:
        pytest.skip(f"{', '.join(MISSING)} not installed ({EXTRA}); the others were checked")


def test_report_to_config(llama_dir, tmp_path, monkeypatch):
    data = str(tmp_path / "t.jsonl")
    assert run_config(llama_dir, "causal_lm", data, tmp_path, report_to=[]).train.report_to == []
    with pytest.raises(ConfigError, match=r"train.report_to lists 'wandbb', which is not a tracker here \(did you mean "
                                          r"wandb\?\); choices: tensorboard, wandb, mlflow"):
        run_config(llama_dir, "causal_lm", data, tmp_path, report_to=["wandbb"])
    with pytest.raises(ConfigError, match="train.tensorboard is false but train.report_to lists tensorboard"):
        run_config(llama_dir, "causal_lm", data, tmp_path, report_to=["tensorboard"], tensorboard=False)
    # a tracker that is not installed is named with the extra when training starts (a finished run's config still
    # reads: `peftlab eval` needs no tracker)
    run = run_config(llama_dir, "causal_lm", data, tmp_path / "out", report_to=["wandb"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        RunTrackers(run, metrics=None)
    assert str(err.value) == ("train.report_to lists wandb, but the wandb package is not installed. Install the "
                              "trackers extra: `pip install 'peftlab[trackers]'` (or `pip install wandb`).")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason=f"mlflow not installed: {EXTRA}")
def test_a_whole_run_method_reports_its_eval_metrics_too(llama_dir, tmp_path, monkeypatch):
    """features (no gradient steps: Method.run through train/method_run.py) sends its before/after eval records to
    train.report_to's trackers as the loop does (mlflow: a local file store)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    from peftlab.train import train

    rows = [{"text": f"{w} {s}", "label": label} for s in sentences(16) for w, label in (("great", "good"),
                                                                                          ("awful", "bad"))]
    out = tmp_path / "run"
    train(run_config(llama_dir, "classify", write_jsonl(tmp_path / "c.jsonl", rows), out, method={"name": "features"},
                     report_to=["mlflow"]), log=lambda *_: None)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    final = [r for r in records if r["split"] == "eval"][-1]
    (path,) = glob.glob(os.path.join(out, "mlruns", "*", "*", "metrics", "eval", "accuracy"))
    logged = {int(step): float(value) for _, value, step in (line.split() for line in open(path))}
    assert logged[final["step"]] == pytest.approx(final["accuracy"], rel=1e-12)
    # A second run in the same process gets its own store: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which
    # the first run's close() took back (else the second run would log into the first run's folder).
    assert "MLFLOW_TRACKING_URI" not in os.environ
    again = tmp_path / "again"
    train(run_config(llama_dir, "classify", str(tmp_path / "c.jsonl"), again, method={"name": "features"},
                     report_to=["mlflow"]), log=lambda *_: None)
    assert glob.glob(os.path.join(again, "mlruns", "*", "*", "metrics", "eval", "accuracy"))
    assert len(glob.glob(os.path.join(out, "mlruns", "*", "*", "metrics"))) == 1  # the first store kept its one run
