"""LoRA+: B learns at loraplus_lr_ratio x A's learning rate, declared through the Method's `param_groups` hook.

Invariants checked:
- `optimizer_param_groups(lr)` puts every B at ratio x lr, every A at lr, embedding A/B at
  loraplus_lr_embedding, and 1-D trained tensors (biases) at ratio x lr: per parameter name, exactly the learning
  rates of PEFT's `create_loraplus_optimizer` for the same model;
- the training loop's optimizer (Trainer) carries those rates, split by weight decay as for every method;
- one AdamW step on a controlled toy moves each B entry by ratio x lr and each A entry by lr (Adam's first
  step is lr x sign(gradient));
- `peftlab train` accepts `method: {name: lora_plus, loraplus_lr_ratio: 16}` and refuses a bad ratio;
- files are plain LoRA files, read back as LoRA; run configs keep the ratio (PEFT loading them with the same logits,
  with no loraplus_* key PEFT would not write: tests/test_conformance.py's round trip on lora_plus/examples.py).
"""

from __future__ import annotations

import json

import peft as hf
import pytest
import torch
import yaml
from peft.optimizers import create_loraplus_optimizer

from peftlab import ConfigError, LoraConfig, PeftModel, get_peft_model
from peftlab.core.model import read_config
from peftlab.methods.lora_plus import LoraPlusConfig
from peftlab.train import Trainer, build_run_config, load_run_config

from .conftest import BUILDERS, model_inputs, output_of, save_tiny


pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


def lr_by_name(model, groups) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in groups for p in g["params"]}


CONFIGS = {
    "llama-qv": ("llama", dict(r=4)),
    "llama-embedding": ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj", "v_proj"])),
    "gpt2-bias-all": ("gpt2", dict(r=4, bias="all")),
    "bert-head": ("bert", dict(r=4, task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_param_group_rates_equal_peft_create_loraplus_optimizer(case):
    kind, cfg = CONFIGS[case]
    ratio, lr, lr_emb = 16.0, 1e-3, 3e-6
    ours = get_peft_model(BUILDERS[kind](), LoraPlusConfig(**cfg, loraplus_lr_ratio=ratio,
                                                           loraplus_lr_embedding=lr_emb))
    theirs = hf.get_peft_model(BUILDERS[kind](), hf.LoraConfig(**cfg))
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_lr_embedding=lr_emb)
    expected = lr_by_name(theirs, optimizer.param_groups)
    got = lr_by_name(ours, ours.optimizer_param_groups(lr))
    assert got == pytest.approx(expected)
    assert all(v == pytest.approx(ratio * lr) for k, v in got.items() if ".lora_B." in k)
    assert all(v == pytest.approx(lr) for k, v in got.items() if ".lora_A." in k)
    if "embed_tokens" in cfg.get("target_modules", []):
        assert {v for k, v in got.items() if "lora_embedding_" in k} == {lr_emb}


def test_group_names_and_defaults():
    model = get_peft_model(BUILDERS["llama"](), LoraPlusConfig(r=2))
    groups = model.optimizer_param_groups(2e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("loraplus_A", 2e-4), ("loraplus_B", pytest.approx(16 * 2e-4))]
    assert (LoraPlusConfig().loraplus_lr_ratio, LoraPlusConfig().loraplus_lr_embedding) == (16.0, 1e-6)


def test_one_adamw_step_moves_B_ratio_times_as_far_as_A():
    """Adam's first step is lr * m / (sqrt(v) + eps) = lr * sign(g) for |g| >> eps: A entries move by lr, B by
    ratio * lr. Both start random (init_lora_weights=False) so that A has a gradient too."""
    ratio, lr = 8.0, 1e-3
    model = get_peft_model(BUILDERS["llama"](), LoraPlusConfig(r=4, init_lora_weights=False, loraplus_lr_ratio=ratio))
    tensors = model.adapter_tensors("default")
    before = {k: t.detach().clone() for k, t in tensors.items()}
    opt = torch.optim.AdamW(model.optimizer_param_groups(lr), weight_decay=0.0, eps=1e-12)
    model.train()
    x = model_inputs("llama")
    model(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    for k, t in tensors.items():
        step = (t.detach() - before[k]).abs()
        moved = step[step > 0]
        assert moved.numel() > 0.9 * step.numel(), k
        want = ratio * lr if "lora_B" in k else lr
        torch.testing.assert_close(moved, torch.full_like(moved, want), rtol=1e-3, atol=0, msg=k)


def test_trainer_optimizer_applies_the_ratio(tmp_path):
    model_dir = save_tiny(tmp_path / "llama", "llama")
    (tmp_path / "t.txt").write_text("\n\n".join(["the movie was great and fun"] * 16))
    raw = {"model": model_dir, "task": "causal_lm",
           "method": {"name": "lora_plus", "r": 2, "loraplus_lr_ratio": 16, "target_modules": ["q_proj", "v_proj"],
                      "bias": "lora_only"},
           "data": {"train_file": str(tmp_path / "t.txt"), "eval_fraction": 0.25, "max_length": 16},
           "train": {"output_dir": str(tmp_path / "out"), "lr": 1e-3, "batch_size": 2, "max_steps": 1,
                     "progress": False, "tensorboard": False, "precision": "fp32", "weight_decay": 0.1}}
    trainer = Trainer(build_run_config(raw), log=lambda *_: None)
    rates = lr_by_name(trainer.peft_model, trainer.optimizer.param_groups)
    assert rates and all(v == pytest.approx(1e-3 * 16 if (".lora_B." in k or k.endswith("bias")) else 1e-3)
                         for k, v in rates.items())
    decay = {lr_by_name(trainer.peft_model, [g]).popitem()[0]: g["weight_decay"]
             for g in trainer.optimizer.param_groups}
    assert all((wd == 0.0) == k.endswith("bias") for k, wd in decay.items())  # 1-D tensors: no decay
    trainer.fit()
    written = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and not any(k.startswith("loraplus") for k in written)
    run_config = yaml.safe_load((tmp_path / "out" / "run_config.yaml").read_text())
    assert run_config["method"]["name"] == "lora_plus" and run_config["method"]["loraplus_lr_ratio"] == 16


def test_train_config_validates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: x\ntask: sft\nmethod: {name: lora_plus, loraplus_lr_ratio: 16}\n"
                    "data: {train_file: t.jsonl}\n")
    run = load_run_config(str(path))
    assert isinstance(run.method, LoraPlusConfig) and run.method.loraplus_lr_ratio == 16
    assert run.method_name == "lora_plus"
    run = load_run_config(str(path), ["method.loraplus_lr_embedding=2e-6"])
    assert run.method.loraplus_lr_embedding == 2e-6
    with pytest.raises(ConfigError, match=r"LoraPlusConfig.loraplus_lr_ratio=0 is not valid; it must be a number > 0"):
        load_run_config(str(path), ["method.loraplus_lr_ratio=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'lr_ratio'.*loraplus_lr_ratio"):
        load_run_config(str(path), ["method.lr_ratio=4"])


def test_files_are_plain_lora_files(tmp_path):
    """The file says LORA with LoraConfig's keys only, and peftlab reads it back as plain LoRA (PEFT loading it with
    the same logits is the conformance suite's round trip on lora_plus/examples.py)."""
    model = get_peft_model(BUILDERS["llama"](), LoraPlusConfig(r=4, init_lora_weights=False, loraplus_lr_ratio=4,
                                                               task_type="CAUSAL_LM"))
    x = model_inputs("llama")
    expected = output_of(model, x)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA"
    assert set(written) <= set(hf.LoraConfig().to_dict())  # no loraplus_* key: PEFT's LoraConfig has none
    assert type(read_config(str(tmp_path))) is LoraConfig
    torch.testing.assert_close(output_of(PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path), x), expected,
                               rtol=0, atol=0)
