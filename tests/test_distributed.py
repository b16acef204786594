"""The same loop under `accelerate launch --num_processes 2` (CPU, gloo) follows the same loss trajectory and
reaches the same adapter as one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from .conftest import save_tiny
from .conftest import sentences as _sentences

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if r["split"] == "train"]


def assert_two_processes_match_one(tmp_path, config: dict, one_overrides=(), two_overrides=()) -> None:
    """Train `config` (a run config without output_dir) in one process with batch 8, then under `accelerate launch`
    in two processes with batch 4 each (the same global batch); the per-step train losses must agree to 1e-5 and the
    adapters to 1e-4. `*_overrides`: extra key=value settings for one side."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    script = os.path.join(HERE, "dist_train_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    one = tmp_path / "one"
    subprocess.run([sys.executable, script, str(path), f"train.output_dir={one}", "train.batch_size=8",
                    *one_overrides], check=True, env=env, capture_output=True)
    two = tmp_path / "two"
    # --multi_gpu selects the torchrun launcher; on a machine without CUDA the Trainer asks Accelerate for
    # cpu=True, which makes the processes join over gloo (the --cpu launcher would start only one process).
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    proc = subprocess.run(launch + [script, str(path), f"train.output_dir={two}", "train.batch_size=4",
                                    *two_overrides], env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-5, atol=1e-6)
    a = load_file(os.path.join(one, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(two, "adapter", "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model_dir = save_tiny(tmp_path / "llama", "llama")
    (tmp_path / "corpus.txt").write_text("\n\n".join(_sentences(48)))
    assert_two_processes_match_one(tmp_path, {
        "model": model_dir, "task": "causal_lm",
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": str(tmp_path / "corpus.txt"), "eval_fraction": 0.2, "max_length": 32},
        "train": {"lr": 1e-2, "max_steps": 5, "log_every": 1, "progress": False, "tensorboard": False,
                  "precision": "fp32"}})
