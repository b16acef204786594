"""The training loop on tiny models: every task trains (loss falls, adapter moves, base stays), resume equals
an uninterrupted run, accumulation equals a big batch, checkpointing still trains the adapter, and config
errors name the bad key with the nearest valid ones."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab.core.config import ConfigError
from peftlab.train import Trainer, load_run_config, train
from peftlab.train.loop import lr_lambda, param_groups_with_decay

from .conftest import run_config as _run
from .conftest import save_tiny, straight_and_resumed
from .conftest import sentences as _sentences
from .conftest import write_jsonl as _write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _adapter(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def _train_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if r["split"] == "train"]


# ---- each task trains ----------------------------------------------------------------------------------------

def test_causal_lm_on_raw_text_trains_and_writes_every_artifact(llama_dir, tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(_sentences(40)))
    out = tmp_path / "run"
    trainer = Trainer(_run(llama_dir, "causal_lm", str(txt), out), log=lambda *_: None)
    base_before = {n: p.detach().clone() for n, p in trainer.peft_model.named_parameters() if not p.requires_grad}
    result = trainer.fit()
    losses = _train_losses(out)
    assert losses[-1] < losses[0], losses
    assert result["after"]["loss"] < result["before"]["loss"]
    for n, p in trainer.peft_model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert any(t.abs().sum() > 0 for k, t in _adapter(out).items() if "lora_B" in k), "B must move off zero"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
                 "metrics.jsonl", "run_config.yaml"):
        assert os.path.isfile(os.path.join(out, name)), name
    card = open(os.path.join(out, "adapter", "README.md")).read()
    assert "lora" in card and "| loss |" in card


@pytest.mark.parametrize("shape", ["chat", "prompt_response", "alpaca"])
def test_sft_trains_on_each_row_shape(llama_dir, tmp_path, shape):
    rows = []
    for i, s in enumerate(_sentences(32, seed=3)):
        reply = "positive" if i % 2 else "negative"
        rows.append({"chat": {"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": reply}]},
                     "prompt_response": {"prompt": s, "response": reply},
                     "alpaca": {"instruction": "review", "input": s, "output": reply}}[shape])
    out = tmp_path / "run"
    result = train(_run(llama_dir, "sft", _write_jsonl(tmp_path / "d.jsonl", rows), out), log=lambda *_: None)
    assert result["after"]["loss"] < result["before"]["loss"]


def test_classify_learns_a_separable_task_and_saves_the_head(tmp_path):
    model_dir = save_tiny(tmp_path / "bert", "bert")
    rows = [{"text": f"{w} {s}", "label": w} for s in _sentences(48, seed=5)
            for w in ["positive", "negative"]]
    out = tmp_path / "run"
    method = {"name": "lora", "r": 4, "lora_alpha": 8}
    result = train(_run(model_dir, "classify", _write_jsonl(tmp_path / "d.jsonl", rows), out, method=method,
                        max_steps=30), log=lambda *_: None)
    assert result["after"]["accuracy"] > 0.9 and result["after"]["accuracy"] > result["before"]["accuracy"]
    assert set(result["after"]) >= {"loss", "accuracy", "macro_f1"}
    assert any(k.endswith("classifier.weight") for k in _adapter(out)), "the new head is saved with the adapter"


# ---- exactness of the loop's bookkeeping -----------------------------------------------------------------------

def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(llama_dir, tmp_path, monkeypatch):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(_sentences(40)))
    method = {"name": "lora", "r": 4, "lora_dropout": 0.2, "target_modules": ["q_proj", "v_proj"]}
    straight, broken, at_crash = straight_and_resumed(
        lambda out: _run(llama_dir, "causal_lm", str(txt), out, method=method, save_every=3), tmp_path, monkeypatch)
    assert at_crash == ["step-000003", "step-000006"]
    a, b = _adapter(straight), _adapter(broken)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_gradient_accumulation_equals_one_big_batch(llama_dir, tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(_sentences(40)))
    big = tmp_path / "big"
    train(_run(llama_dir, "causal_lm", str(txt), big, batch_size=8, max_steps=4), log=lambda *_: None)
    accum = tmp_path / "accum"
    train(_run(llama_dir, "causal_lm", str(txt), accum, batch_size=4, grad_accum=2, max_steps=4), log=lambda *_: None)
    a, b = _adapter(big), _adapter(accum)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_gradient_checkpointing_still_sends_gradients_to_the_adapter(llama_dir, tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(_sentences(40)))
    plain = _adapter_after(llama_dir, txt, tmp_path / "plain", False)
    ckpt = _adapter_after(llama_dir, txt, tmp_path / "ckpt", True)
    assert any(t.abs().sum() > 0 for k, t in ckpt.items() if "lora_B" in k)
    for k in plain:
        torch.testing.assert_close(plain[k], ckpt[k], rtol=1e-4, atol=1e-6, msg=k)


def _adapter_after(model_dir, txt, out, checkpointing):
    train(_run(model_dir, "causal_lm", str(txt), out, max_steps=3, gradient_checkpointing=checkpointing),
          log=lambda *_: None)
    return _adapter(out)


def test_no_weight_decay_on_one_dimensional_tensors(llama_dir, tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(_sentences(20)))
    trainer = Trainer(_run(llama_dir, "causal_lm", str(txt), tmp_path / "o", weight_decay=0.1,
                           method={"name": "lora", "r": 2, "bias": "all"}), log=lambda *_: None)
    groups = param_groups_with_decay(trainer.peft_model, 1e-3, 0.1)
    for g in groups:
        assert all((p.ndim < 2) == (g["weight_decay"] == 0.0) for p in g["params"])


def test_schedules_warm_up_then_decay():
    linear = lr_lambda("linear", warmup=2, total=10)
    assert [round(linear(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    cosine = lr_lambda("cosine", warmup=0, total=10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, 10)(9) == 1.0


# ---- configs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("train.lr_rate=1e-4", r"unknown key 'lr_rate'.*Did you mean lr"),
    ("train.batch_size=0", r"batch_size=0 is not valid"),
    ("train.scheduler=cosin", r"scheduler='cosin' is not valid.*cosine"),
    ("method.name=lorra", r"No method named 'lorra'.*Did you mean lora"),
    ("method.rank=8", r"unknown key 'rank': peftlab calls it 'r'"),
    ("task=clasify", r"task='clasify' is not valid"),
    ("lr=3", r"unknown key 'lr'"),
])
def test_config_errors_name_the_key_and_the_nearest_valid_ones(override, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "x", "task": "causal_lm", "method": "lora",
                                    "data": {"train_file": "t.txt"}}))
    with pytest.raises(ConfigError, match=message):
        load_run_config(str(path), [override])


def test_overrides_reach_nested_options_and_yaml_floats_without_dot_parse(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: x\ntask: sft\nmethod: lora\ndata: {train_file: t.jsonl}\ntrain: {lr: 2e-4}\n")
    run = load_run_config(str(path), ["method.r=32", "data.max_length=64"])
    assert run.train.lr == 2e-4 and run.method.r == 32 and run.data.max_length == 64


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))) +
                         [os.path.join(REPO, "peftlab", "configs", "default.yaml")])
def test_every_example_config_validates(path):
    run = load_run_config(path)
    assert run.method is not None and run.data.train_file


def test_lm_loss_sum_over_count_equals_transformers_mean_loss():
    from peftlab.train.tasks import lm_loss_sum

    from .conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(1, 90, (3, 11), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, 7:] = -100  # padding
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    total, count = lm_loss_sum(out.logits, {"labels": labels})
    torch.testing.assert_close(total / count, out.loss)
    assert count == int((labels[:, 1:] != -100).sum())


def test_a_run_can_follow_an_accelerator_with_another_precision():
    """transformers' Trainer (or any Accelerator) earlier in the same process fixed Accelerate's per-process state at
    precision "no"; a later bf16 run used to fail with "AcceleratorState has already been initialized"."""
    from accelerate import Accelerator

    from peftlab.train.loop import new_accelerator

    Accelerator(mixed_precision="no", cpu=True)
    assert new_accelerator("bf16").mixed_precision == "bf16"
    assert new_accelerator("fp32").mixed_precision == "no"


def test_classification_metrics_by_hand():
    """train/tasks.py's accuracy and macro-F1 (one implementation with the baselines'): 3 classes, class 2 never
    predicted nor present (F1 0, counted in the mean), class 0: tp 2, fp 1, fn 0 -> F1 0.8; class 1: tp 1, fp 0,
    fn 1 -> F1 2/3."""
    from peftlab.train.tasks import classification_metrics

    got = classification_metrics([0, 0, 1, 0], [0, 0, 1, 1], 3)
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    assert classification_metrics([], [], 2) == {"accuracy": 0.0, "macro_f1": 0.0}
