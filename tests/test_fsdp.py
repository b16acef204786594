"""LoRA under FSDP2 across 2 CPU processes (gloo), launched with configs/accelerate/fsdp_cpu_2proc.yaml as a user
would: each decoder block is one FSDP unit holding sharded frozen base weights and sharded trainable LoRA weights;
the saved adapter is one ordinary PEFT folder equal to the 1-process adapter; a run stopped mid-way resumes from its
FSDP checkpoint (gathered adapter + gathered optimizer state) to the same adapter.

The FSDP runs take 2 micro-batches of 2 rows per step and process (gradient accumulation: the first micro-batch's
gradients stay local, FSDP2's set_requires_gradient_sync(False)), the reference 1 batch of 8 rows. Tolerance: per-step
train losses within 1e-5 (relative) and adapter tensors within 1e-4 (relative) / 1e-6 (absolute), as for DDP
(tests/test_distributed.py). Seen: losses within 1e-7, adapter within 6e-8 (the order of the gradient sums is the only
difference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import types

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab.core.config import ConfigError

from .conftest import save_tiny
from .conftest import sentences as _sentences
from .test_distributed import HERE, _free_port

ROOT = os.path.dirname(HERE)
FSDP_CONFIG = os.path.join(ROOT, "configs", "accelerate", "fsdp_cpu_2proc.yaml")


def _train_records(out) -> dict[int, float]:
    """{step: train loss} from metrics.jsonl (a resumed run appends: the later record of a step wins)."""
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh) if r["split"] == "train"}


def _launch_fsdp(config_path, out, *extra, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env_extra or {})}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG,
              "--main_process_port", str(_free_port())]
    return subprocess.run(launch + [os.path.join(HERE, "fsdp_train_script.py"), str(config_path),
                                    f"train.output_dir={out}", "train.batch_size=2", "train.grad_accum=2", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def test_fsdp_two_cpu_processes_match_one_process_and_resume(tmp_path):
    from peftlab.train import load_run_config, train

    model_dir = save_tiny(tmp_path / "llama", "llama")
    (tmp_path / "corpus.txt").write_text("\n\n".join(_sentences(48)))
    config = {"model": model_dir, "task": "causal_lm",
              "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
              "data": {"train_file": str(tmp_path / "corpus.txt"), "eval_fraction": 0.2, "max_length": 32},
              "train": {"lr": 1e-2, "max_steps": 5, "save_every": 2, "log_every": 1, "progress": False,
                        "tensorboard": False, "precision": "fp32"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    one = tmp_path / "one"  # the reference: one process, batch 8 (the same global batch as 2 processes x 2 x 2 accum.)
    train(load_run_config(str(path), [f"train.output_dir={one}", "train.batch_size=8"]), log=lambda *_: None)

    # FSDP, stopped before step 4 (3 steps done, checkpoint step-000002 on disk), then --resume from that checkpoint.
    two = tmp_path / "two"
    crashed = _launch_fsdp(path, two, env_extra={"PEFTLAB_TEST_CRASH_AT": "3"})
    assert crashed.returncode != 0 and "simulated crash before step 4" in crashed.stderr, crashed.stderr[-3000:]
    assert sorted(os.listdir(two / "checkpoints")) == ["step-000002"]
    assert not (two / "adapter").exists()
    resumed = _launch_fsdp(path, two, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    facts = json.loads((two / "fsdp_facts.json").read_text())
    assert facts["log"].startswith("FSDP2 over 2 CPU processes"), facts
    assert facts["block_is_fsdp_unit"] and facts["root_is_fsdp_unit"], facts
    # One unit, both kinds of tensor, each split along dim 0 over the 2 processes.
    base_w, lora_a = facts["base_weight"], facts["lora_A"]
    assert base_w == {"dtensor": True, "global": [32, 32], "local": [16, 32], "requires_grad": False}, base_w
    assert lora_a == {"dtensor": True, "global": [4, 32], "local": [2, 32], "requires_grad": True}, lora_a

    # Losses of every step (1-3 from the stopped run, 3-5 after resuming) and the final adapter match one process.
    ref, got = _train_records(one), _train_records(two)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor([got[s] for s in ref]), torch.tensor(list(ref.values())),
                               rtol=1e-5, atol=1e-6)
    # One ordinary PEFT folder: the same files, keys, shapes and config as the 1-process adapter (gathered, not shards).
    assert sorted(os.listdir(two / "adapter")) == sorted(os.listdir(one / "adapter"))
    assert json.loads((two / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((one / "adapter" / "adapter_config.json").read_text())
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    # The FSDP checkpoint holds a whole adapter too, and its optimizer state gathered (full shapes, by name).
    ckpt = two / "checkpoints" / "step-000004"
    c = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert {k: t.shape for k, t in c.items()} == {k: t.shape for k, t in a.items()}
    state = torch.load(ckpt / "state.pt", weights_only=True)["optimizer"]["state"]
    lora_a_state = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert lora_a_state["exp_avg"].shape == (4, 32)
    # Resuming that FSDP checkpoint in one unsharded process is refused in one line, not half-loaded.
    with pytest.raises(ConfigError, match="written under FSDP"):
        train(load_run_config(str(path), [f"train.output_dir={two}", "train.batch_size=8"]), resume=True,
              log=lambda *_: None)


def _cpu_launch(processes=2):
    """What Accelerate reports for a multi-process CPU launch (it never reports FSDP on CPU)."""
    return types.SimpleNamespace(distributed_type=types.SimpleNamespace(value="MULTI_CPU"), num_processes=processes)


def test_fsdp_is_taken_on_cpu_only_when_the_launch_asked_for_it_and_version_1_is_refused(monkeypatch):
    from peftlab.train.fsdp import Sharding

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not Sharding(_cpu_launch()).active  # plain multi-CPU (DDP over gloo)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert Sharding(_cpu_launch()).mode == "torch"
    assert not Sharding(_cpu_launch(processes=1)).active
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        Sharding(_cpu_launch())


def test_methods_whose_hooks_need_whole_tensors_are_refused_under_fsdp(monkeypatch):
    from peftlab import AdaLoraConfig, LoraConfig, PromptTuningConfig, TaskType, get_peft_model
    from peftlab.train.fsdp import Sharding

    from .conftest import tiny_llama

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    sharding = Sharding(_cpu_launch())
    sharding.check_methods(get_peft_model(tiny_llama(), LoraConfig(r=2)))  # LoRA: no such hooks
    for config, hooks in ((AdaLoraConfig(init_r=4, target_r=2, total_step=10), "on_step, extra_loss"),
                          (PromptTuningConfig(num_virtual_tokens=2, task_type=TaskType.CAUSAL_LM),
                           "forward, model_modules")):
        with pytest.raises(ConfigError, match=f"declares {hooks}.*DDP"):
            sharding.check_methods(get_peft_model(tiny_llama(), config))
