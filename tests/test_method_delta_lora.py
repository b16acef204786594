"""Delta-LoRA: the base-weight update written out independently, and files that reproduce the trained model.

- after k steps, W_k = W_0 + lambda * sum over the steps t past the warm-up of s (B_t A_t - B_{t-1} A_{t-1}), with
  the A, B of every step recorded by the test (llama's nn.Linear and GPT-2's Conv1D, stored (in, out));
- save -> load (peftlab) reproduces the trained model's logits exactly, and HF PEFT reads the same folder (as LoRA
  plus the base_layer.weight entries) with the same logits; merging gives W_k + s B_k A_k;
- `peftlab train`: the adapted base weights move, the saved adapter reproduces the run, and `--resume` from a
  checkpoint reaches the same files as an uninterrupted run (the base update continues exactly);
- config and file errors say what to do.
"""

from __future__ import annotations

import json

import peft as hf
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core.config import ConfigError
from peftlab.methods.delta_lora import DeltaLoraConfig, DeltaLoraLinear
from peftlab.train import Trainer

from .conftest import model_inputs, output_of, run_config, sentences, straight_and_resumed, tiny_gpt2, tiny_llama
from .peft_parity import TIGHT  # PEFT's fp32 ops in the same order: equal up to matmul summation order

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


# PEFT's note on the two extra config keys, transformers' deprecations
pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


def _layers(model):
    return [(p, m) for p, m in model.adapter_layers() if isinstance(m, DeltaLoraLinear)]


def _train_recording(model, kind, steps, lr=2e-2):
    """Run `steps` optimizer steps as peftlab's loop does; return [{path: (A, B)}] after step 0, 1, ..., steps."""
    x = model_inputs(kind)
    opt = torch.optim.AdamW(model.optimizer_param_groups(lr=lr))
    model.train()
    snap = lambda: {p: tuple(t.detach().clone() for t in m.lora_pair("default")) for p, m in _layers(model)}  # noqa: E731
    history = [snap()]
    for step in range(1, steps + 1):
        model(**x, labels=x["input_ids"]).loss.backward()
        opt.step()
        model.on_step(step)
        opt.zero_grad()
        history.append(snap())
    model.eval()
    return history


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_base_weight_is_w0_plus_lambda_times_the_product_changes_since_warm_up(kind):
    lam, start, steps, alpha, r = 0.5, 3, 8, 8, 4
    model = peftlab.get_peft_model(BUILD[kind](), DeltaLoraConfig(r=r, lora_alpha=alpha, delta_lambda=lam,
                                                                  update_start_step=start))
    w0 = {p: m.base_layer.weight.detach().clone() for p, m in _layers(model)}
    others = {n: t.detach().clone() for n, t in model.named_parameters() if "base_layer.weight" not in n}
    x = model_inputs(kind)
    opt = torch.optim.AdamW(model.optimizer_param_groups(lr=2e-2))
    model.train()
    history = [{p: tuple(t.detach().clone() for t in m.lora_pair("default")) for p, m in _layers(model)}]
    for step in range(1, steps + 1):
        model(**x, labels=x["input_ids"]).loss.backward()
        opt.step()
        model.on_step(step)
        opt.zero_grad()
        history.append({p: tuple(t.detach().clone() for t in m.lora_pair("default")) for p, m in _layers(model)})
        if step <= start:  # warm-up: pure LoRA
            assert all(torch.equal(m.base_layer.weight, w0[p]) for p, m in _layers(model)), step
    s = alpha / r
    for path, layer in _layers(model):
        total = torch.zeros_like(w0[path].T if kind == "gpt2" else w0[path])  # (out, in)
        for t in range(start + 1, steps + 1):
            (A_t, B_t), (A_prev, B_prev) = history[t][path], history[t - 1][path]
            total += s * (B_t @ A_t) - s * (B_prev @ A_prev)
        expected = w0[path] + lam * (total.T if kind == "gpt2" else total)  # Conv1D stores W as (in, out)
        assert not torch.allclose(expected, w0[path]), "the base should have moved"
        torch.testing.assert_close(layer.base_layer.weight.detach(), expected, rtol=1e-5, atol=1e-6, msg=path)
    for n, t in model.named_parameters():  # nothing else moved but the adapter itself
        if n in others and not t.requires_grad:
            assert torch.equal(t, others[n]), n


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_load_reproduces_the_trained_model_in_peftlab_and_peft(kind, tmp_path):
    model = peftlab.get_peft_model(BUILD[kind](), DeltaLoraConfig(r=4, update_start_step=2, delta_lambda=1.0))
    _train_recording(model, kind, steps=6)
    x = model_inputs(kind)
    expected = output_of(model, x)
    assert not torch.allclose(expected, output_of(BUILD[kind](), x), atol=1e-4)
    model.save_pretrained(tmp_path)

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["delta_lambda"] == 1.0 and config["update_start_step"] == 2
    for path, layer in _layers(model):
        for suffix in ("lora_A.weight", "lora_B.weight", "base_layer.weight"):
            assert f"base_model.model.{path}.{suffix}" in tensors
        assert torch.equal(tensors[f"base_model.model.{path}.base_layer.weight"], layer.base_layer.weight)
    assert len(tensors) == 3 * len(_layers(model))

    back = peftlab.PeftModel.from_pretrained(BUILD[kind](), tmp_path)
    assert peftlab.get_method("delta_lora") is back.method_of("default")
    torch.testing.assert_close(output_of(back, x), expected, rtol=0, atol=0)
    in_peft = hf.PeftModel.from_pretrained(BUILD[kind](), tmp_path)
    torch.testing.assert_close(output_of(in_peft, x), expected, **TIGHT)

    for path, layer in _layers(model):  # merging: W_k + s B_k A_k
        A, B = layer.lora_pair("default")
        sba = layer.scaling["default"] * (B @ A)
        want = layer.base_layer.weight + (sba.T if kind == "gpt2" else sba)
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight, want.detach(), rtol=1e-6, atol=1e-6)
        layer.unmerge()


def test_loaded_adapter_trains_on_from_the_loaded_a_and_b(tmp_path):
    """after_load: the loaded A, B are the reference, so the first step after loading adds only that step's change."""
    model = peftlab.get_peft_model(tiny_llama(), DeltaLoraConfig(r=4, update_start_step=0))
    _train_recording(model, "llama", steps=3)
    model.save_pretrained(tmp_path)
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    w_loaded = {p: m.base_layer.weight.detach().clone() for p, m in _layers(loaded)}
    history = _train_recording(loaded, "llama", steps=1)
    for path, layer in _layers(loaded):
        (A0, B0), (A1, B1) = history[0][path], history[1][path]
        s = layer.scaling["default"]
        expected = w_loaded[path] + 0.5 * (s * (B1 @ A1) - s * (B0 @ A0))
        torch.testing.assert_close(layer.base_layer.weight.detach(), expected, rtol=1e-5, atol=1e-6)


# ---- `peftlab train` ---------------------------------------------------------------------------------------


def _run(model_dir, train_file, out, **train_opts):
    method = {"name": "delta_lora", "r": 4, "lora_alpha": 8, "update_start_step": 4, "delta_lambda": 0.5,
              "target_modules": ["q_proj", "v_proj"]}
    return run_config(model_dir, "causal_lm", train_file, out, method, **{"max_steps": 10, **train_opts})


def _load_base(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_peftlab_train_moves_the_base_and_the_adapter_reproduces_the_run(llama_dir, tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(sentences(40)))
    out = tmp_path / "run"
    trainer = Trainer(_run(llama_dir, str(txt), out), log=lambda *_: None)
    trainer.fit()
    model = trainer.peft_model.eval()
    original = _load_base(llama_dir)
    for path, layer in _layers(model):
        assert not torch.equal(layer.base_layer.weight, original.get_parameter(f"{path}.weight")), path
    x = model_inputs("llama")
    expected = output_of(model, x)
    back = peftlab.PeftModel.from_pretrained(_load_base(llama_dir), out / "adapter")
    torch.testing.assert_close(output_of(back, x), expected, rtol=0, atol=0)
    in_peft = hf.PeftModel.from_pretrained(_load_base(llama_dir), out / "adapter")
    torch.testing.assert_close(output_of(in_peft, x), expected, **TIGHT)


def test_resume_reaches_the_same_files_as_an_uninterrupted_run(llama_dir, tmp_path, monkeypatch):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(sentences(40)))
    # crash at 7: past the warm-up (4), so the base has moved and the checkpoint at 6 must hold it
    straight, broken, _ = straight_and_resumed(lambda out: _run(llama_dir, str(txt), out, save_every=3),
                                               tmp_path, monkeypatch)
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("base_layer.weight") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ---- config and files ------------------------------------------------------------------------------------------

def test_dropout_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="lora_dropout=0.1.*no dropout.*Set lora_dropout=0"):
        DeltaLoraConfig(lora_dropout=0.1)


def test_files_are_told_apart_and_a_file_without_base_weights_is_refused(tmp_path):
    model = peftlab.get_peft_model(tiny_llama(), DeltaLoraConfig(r=4))
    model.save_pretrained(tmp_path / "delta")
    peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4)).save_pretrained(tmp_path / "lora")
    assert peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").method_of("default").name == "lora"
    assert peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "delta").method_of("default").name == "delta_lora"
    path = tmp_path / "delta" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith("base_layer.weight")}, path)
    with pytest.raises(peftlab.AdapterFileError, match="no base weights"):
        peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "delta")


def test_saving_while_merged_is_refused(tmp_path):
    model = peftlab.get_peft_model(tiny_llama(), DeltaLoraConfig(r=4))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.save_pretrained(tmp_path)
