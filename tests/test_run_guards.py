"""One run per output folder, and runs that diverge stop (issue 15).

- A second `peftlab train` into a folder another run holds fails at once with that run's PID (an OS file lock); a
  rerun into a finished run's folder refuses unless --overwrite or --resume, and never appends to its metrics.
- A loss, gradient norm or rollout that is not finite stops the run at that step, before the update, with the step
  and the likely cause; the last good checkpoint stays; metrics.jsonl stays strict JSON.

Atomic folders, names and the weights guards are in tests/test_reliability.py; the CLI error boundary in
tests/test_error_boundary.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from peftlab import ConfigError
from peftlab.cli.main import main
from peftlab.io import adapter_files
from peftlab.io.lock import FolderLockedError, folder_lock
from peftlab.train import train
from peftlab.train.checkpoint import list_checkpoints
from peftlab.train.loop import TrainingDivergedError

from .conftest import run_config, sentences, write_jsonl
from .test_reliability import REPO, assert_one_line

@pytest.fixture(scope="module")
def classify_file(tmp_path_factory):
    rows = [{"text": s, "label": ["pos", "neg"][i % 2]} for i, s in enumerate(sentences(32, seed=3))]
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)


def test_a_second_run_into_a_locked_folder_fails_at_once_with_the_other_pid(tmp_path, llama_dir, classify_file):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from peftlab.io.lock import folder_lock\n"
         f"with folder_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with pytest.raises(FolderLockedError, match=rf"in use by another peftlab run \(PID {holder.pid},"):
            train(run_config(llama_dir, "classify", classify_file, out), log=lambda *_: None)
        assert time.perf_counter() - start < 2  # at once: no model loaded, no waiting
    finally:
        holder.kill()
        holder.wait()
    # Killed with SIGKILL: the kernel dropped its lock; the file still names it, and the next run takes over.
    assert f"PID {holder.pid}" in (out / ".peftlab.lock").read_text()
    said = []
    with folder_lock(out, log=said.append):
        pass
    assert f"PID {holder.pid}" in said[0] and "ended without releasing" in said[0]


def test_rerun_into_a_finished_folder_refuses_unless_overwrite_or_resume(tmp_path, llama_dir, classify_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 123.0, "earlier_run": true}\n')
    run = run_config(llama_dir, "classify", classify_file, out, max_steps=2)
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics\.jsonl\)\. Pass --overwrite.*--resume"):
        train(run, log=lambda *_: None)
    said = []
    train(run, log=said.append, overwrite=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines and not any("earlier_run" in line for line in lines)
    assert any("--overwrite: deleting the earlier run's metrics.jsonl" in s for s in said)
    # a folder holding only an earlier run's tracker output (train.report_to: wandb / mlflow) is an earlier run too
    tracked = tmp_path / "tracked"
    (tracked / "wandb" / "offline-run-1").mkdir(parents=True)
    (tracked / "mlruns").mkdir()
    with pytest.raises(ConfigError, match=r"already holds a run \(wandb, mlruns\)"):
        train(run_config(llama_dir, "classify", classify_file, tracked, max_steps=1), log=lambda *_: None)
    train(run_config(llama_dir, "classify", classify_file, tracked, max_steps=1), log=lambda *_: None, overwrite=True)
    assert not (tracked / "wandb").exists() and not (tracked / "mlruns").exists()
    (out / "x").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        train(run_config(llama_dir, "classify", classify_file, out / "x"), log=lambda *_: None)


def strict_json(line: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(
        tmp_path, llama_dir, classify_file, capsys):
    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    raw = yaml.safe_load(yaml.safe_dump({"model": llama_dir, "task": "classify",
                                         "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                                         "data": {"train_file": classify_file, "eval_fraction": 0.25,
                                                  "max_length": 32},
                                         "train": {"output_dir": str(out), "lr": 1e30, "max_grad_norm": None,
                                                   "batch_size": 4, "max_steps": 12, "log_every": 1,
                                                   "save_every": 1, "progress": False, "tensorboard": False,
                                                   "precision": "fp32"}}))
    path.write_text(yaml.safe_dump(raw))
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert_one_line(code, err, "training diverged at step", "train.lr", "last good checkpoint")
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    assert 1 < step <= 12
    assert not (out / "adapter").exists()  # no adapter saved from a diverged run
    kept = list_checkpoints(str(out / "checkpoints"))
    assert kept and all(int(os.path.basename(k).split("-")[1]) < step for k in kept)
    for k in kept:  # every kept checkpoint loads (finite weights)
        adapter_files.read_weights(os.path.join(k, "adapter"))
    records = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["step"] < step for r in records)
    assert all(math.isfinite(r["loss"]) for r in records if r.get("loss") is not None)


def test_a_diverging_ppo_run_stops_at_the_first_non_finite_step_through_the_cli(tmp_path, llama_dir, capsys,
                                                                                   monkeypatch):
    """PPO has the same guard as the supervised loop: an absurd lr stops the run with one line naming the step and
    train.lr, checkpoints before it are kept and finite, no adapter is saved, metrics.jsonl stays JSON."""
    import functools

    import peftlab.train.ppo as ppo

    # The CLI needs a reward adapter; the reward function of tests/test_ppo.py's tiny runs stands in for it.
    monkeypatch.setattr(ppo, "train_ppo", functools.partial(ppo.train_ppo, reward_fn=lambda p, t, ids: [
        float(len(r)) for r in ids]))
    out = tmp_path / "run"
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump({
        "model": llama_dir, "task": "ppo", "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        # One update per iteration: the first (finite) update makes iteration 1 and its checkpoint; the next one
        # overflows.
        "ppo": {"prompts": ["write a review", "the movie was"], "max_new_tokens": 4, "rollout_batch_size": 4,
                "minibatch_size": 4, "ppo_epochs": 1},
        "train": {"output_dir": str(out), "lr": 1e30, "max_grad_norm": None, "max_steps": 6, "log_every": 1,
                  "save_every": 1, "eval_every": 1, "progress": False, "tensorboard": False, "precision": "fp32"}}))
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert_one_line(code, err, "training diverged at step", "train.lr", "The likely cause is a learning rate")
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    assert 1 < step <= 6
    assert not (out / "adapter").exists()
    kept = list_checkpoints(str(out / "checkpoints"))
    assert kept and f"the last good checkpoint is {kept[-1]}" in err
    assert all(int(os.path.basename(k).split("-")[1]) < step for k in kept)
    for k in kept:
        adapter_files.read_weights(os.path.join(k, "adapter", "policy"))
    records = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["step"] < step for r in records)


def test_a_ppo_iteration_with_non_finite_rollouts_stops_before_any_update(tmp_path, llama_dir):
    """A NaN reward (a reward_fn's, or a policy overflowed by the last update) is named before PPO trains on it."""
    from peftlab.train import build_run_config
    from peftlab.train.ppo import POLICY, PPOTrainer

    run = build_run_config({
        "model": llama_dir, "task": "ppo", "method": {"name": "lora", "r": 4, "target_modules": ["q_proj"]},
        "ppo": {"prompts": ["write a review"], "max_new_tokens": 3, "rollout_batch_size": 2, "minibatch_size": 2},
        "train": {"output_dir": str(tmp_path / "o"), "progress": False, "tensorboard": False, "precision": "fp32"}})
    trainer = PPOTrainer(run, reward_fn=lambda p, t, ids: [float("nan")] * len(ids), log=lambda *_: None)
    before = {k: t.detach().clone() for k, t in trainer.peft_model.trainable_tensors(POLICY).items()}
    with pytest.raises(TrainingDivergedError, match=r"at step 1: the rollouts' scores hold NaN/inf values.*train\.lr"):
        trainer._iteration()
    assert trainer.state.optimizer_steps == 0
    for k, t in trainer.peft_model.trainable_tensors(POLICY).items():
        assert torch.equal(t, before[k]), k


def test_metrics_jsonl_stays_json_when_a_value_is_not_finite(tmp_path):
    from peftlab.train.metrics_log import MetricsLogger

    logger = MetricsLogger(str(tmp_path), tensorboard=False)
    logger.write({"step": 3, "split": "eval", "loss": float("nan"), "accuracy": float("inf"), "ok": 1.5})
    logger.close()
    assert strict_json((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 3, "split": "eval", "loss": None, "accuracy": None, "ok": 1.5}


def test_training_diverged_error_is_raised_before_the_update(tmp_path, llama_dir, classify_file, monkeypatch):
    """The guard runs before optimizer.step: the weights after the failing step are those before it."""
    from peftlab.train import Trainer

    trainer = Trainer(run_config(llama_dir, "classify", classify_file, tmp_path / "r"), log=lambda *_: None)
    before = {k: t.detach().clone() for k, t in trainer.peft_model.trainable_tensors("default").items()}
    original = type(trainer.task).forward

    def nan_loss(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return dataclasses.replace(out, loss_sum=out.loss_sum * float("nan"))

    monkeypatch.setattr(type(trainer.task), "forward", nan_loss)
    with pytest.raises(TrainingDivergedError, match=r"at step 1: the loss is nan.*no checkpoint was saved"):
        trainer._step()
    for k, t in trainer.peft_model.trainable_tensors("default").items():
        assert torch.equal(t, before[k]), k
