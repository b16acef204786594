"""AdaLoRA against HF PEFT (`import peft`, the reference) and against the equations written out by hand.

- forward, merge and state-dict names equal PEFT's on the same weights (llama's nn.Linear, GPT-2's Conv1D,
  an nn.Conv2d);
- the orthogonality regulariser equals its formula, and PEFT's (loss with minus loss without);
- sensitivity/uncertainty EMAs, triplet scores and the cubic budget equal hand computations on a toy;
- a training loop driven only by `extra_loss` and `on_step` follows PEFT's `update_and_allocate` loop step for
  step (losses, weights, rank_pattern) and both write the same file;
- `peftlab train` on a tiny model: the kept triplets match the budget, the file loads in PEFT and back in peftlab
  with the same logits; a PEFT-trained, pruned adapter loads in peftlab with PEFT's logits;
- total_step is required, with an error that says what to set.
"""

from __future__ import annotations

import json

import peft as hf
import pytest
import torch
import transformers
from safetensors.torch import load_file

import peftlab
from peftlab.core.config import ConfigError
from peftlab.methods.adalora import AdaLoraConfig
from peftlab.methods.adalora.allocator import adapter_layers, budget_schedule, triplet_scores, update_importance
from peftlab.train import Trainer

from .conftest import model_inputs, output_of, run_config, sentences, tiny_gpt2, tiny_llama
from .peft_parity import TIGHT  # PEFT's fp32 ops in the same order: equal up to matmul summation order

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


# PEFT's Conv1D fan_in_fan_out notes, transformers' deprecations
pytestmark = pytest.mark.usefixtures("quiet_warnings")


def _pair(kind, **cfg):
    """(peftlab model, PEFT model) with the same AdaLoRA config and identical weights."""
    cfg = {"init_r": 4, "target_r": 2, "total_step": 10, "lora_alpha": 8, **cfg}
    theirs = hf.get_peft_model(BUILD[kind](), hf.AdaLoraConfig(**cfg))
    ours = peftlab.get_peft_model(BUILD[kind](), AdaLoraConfig(**cfg))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


# ---- forward, merge, names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_merge_and_names_match_peft(kind):
    ours, theirs = _pair(kind, init_lora_weights=False)  # random P, E, Q: the update is far from zero
    assert list(ours.state_dict()) == list(theirs.state_dict())  # incl. `ranknum.default`, PEFT's names
    x = model_inputs(kind)
    expected = output_of(theirs, x)
    assert not torch.allclose(expected, output_of(BUILD[kind](), x), atol=1e-3)
    torch.testing.assert_close(output_of(ours, x), expected, **TIGHT)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    for (n, a), (m, b) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        assert n == m
        torch.testing.assert_close(a, b, **TIGHT, msg=n)


class _TinyConv(torch.nn.Module):
    """A model with an nn.Conv2d (3 -> 8 channels, 3x3 kernel), for SVDConv2d."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_conv2d_forward_and_merge_match_peft(tmp_path):
    cfg = dict(init_r=4, target_r=2, total_step=10, target_modules=["conv"], init_lora_weights=False)
    theirs = hf.get_peft_model(_TinyConv(), hf.AdaLoraConfig(**cfg))
    ours = peftlab.get_peft_model(_TinyConv(), AdaLoraConfig(**cfg))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, **TIGHT)
        ours.save_pretrained(tmp_path)
        torch.testing.assert_close(hf.PeftModel.from_pretrained(_TinyConv(), tmp_path)(x), expected, **TIGHT)
        torch.testing.assert_close(ours.merge_and_unload()(x), theirs.merge_and_unload()(x), **TIGHT)


def test_identity_at_init_and_ranknum_not_trained():
    ours, _ = _pair("llama")
    x = model_inputs("llama")
    torch.testing.assert_close(output_of(ours, x), output_of(tiny_llama(), x), rtol=0, atol=0)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_B", "lora_E") for n in trainable)


# ---- orthogonality regulariser -----------------------------------------------------------------------------

def test_orthogonal_regulariser_is_the_formula_and_peft_s():
    ours, theirs = _pair("llama", init_lora_weights=False, orth_reg_weight=0.3, task_type="CAUSAL_LM")
    # By hand: 0.3 * mean over every Q (r, in) and P (out, r) of ||Q Q^T - I||_F, ||P^T P - I||_F.
    norms = []
    for _, layer in adapter_layers(ours, "default"):
        Q, P = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
        norms.append(torch.linalg.matrix_norm(Q @ Q.T - torch.eye(4)))
        norms.append(torch.linalg.matrix_norm(P.T @ P - torch.eye(4)))
    expected = 0.3 * sum(norms) / len(norms)
    got = ours.extra_loss()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert got.requires_grad  # it trains P and Q
    x = model_inputs("llama")
    with_reg = theirs(**x, labels=x["input_ids"]).loss  # PEFT adds it inside forward
    plain = theirs.get_base_model()(**x, labels=x["input_ids"]).loss
    torch.testing.assert_close(got.detach(), (with_reg - plain).detach(), rtol=1e-5, atol=1e-6)
    ours.peft_config["default"].inference_mode = True  # a frozen adapter adds nothing
    assert ours.extra_loss() is None


# ---- importance and budget -----------------------------------------------------------------------------------

def test_importance_emas_and_triplet_scores_equal_hand_computation():
    beta1, beta2 = 0.7, 0.6
    model = peftlab.get_peft_model(tiny_llama(), AdaLoraConfig(
        init_r=3, target_r=1, total_step=10, beta1=beta1, beta2=beta2, init_lora_weights=False,
        target_modules=["model.layers.0.self_attn.q_proj"]))
    (_, layer), = adapter_layers(model, "default")
    config = model.peft_config["default"]
    g = torch.Generator().manual_seed(0)
    ema_ipt, ema_unc = {}, {}
    for _ in range(3):
        for t in ("lora_A", "lora_B", "lora_E"):
            p = getattr(layer, t)["default"]
            p.grad = torch.randn(p.shape, generator=g)
            ipt = (p.detach() * p.grad).abs()  # sensitivity |w dL/dw|
            ema_ipt[t] = beta1 * ema_ipt.get(t, 0) + (1 - beta1) * ipt
            ema_unc[t] = beta2 * ema_unc.get(t, 0) + (1 - beta2) * (ipt - ema_ipt[t]).abs()
        update_importance([("q", layer)], "default", config)
    for t in ("lora_A", "lora_B", "lora_E"):
        torch.testing.assert_close(layer.importance["default"][t][0], ema_ipt[t], rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.importance["default"][t][1], ema_unc[t], rtol=1e-6, atol=0)
    s = {t: ema_ipt[t] * ema_unc[t] for t in ema_ipt}
    # triplet i: s(E_i) + mean over row i of s(Q) + mean over column i of s(P)
    expected = torch.stack([s["lora_E"][i, 0] + (s["lora_A"][i].mean() + s["lora_B"][:, i].mean()) for i in range(3)])
    torch.testing.assert_close(triplet_scores([("q", layer)], "default")["q"], expected, rtol=1e-6, atol=0)


def test_budget_schedule_is_cubic_and_equals_peft_s():
    config = AdaLoraConfig(init_r=4, target_r=1, tinit=2, tfinal=3, total_step=10, deltaT=2)
    b0, bT = 12, 3  # 3 modules: 3 x init_r, 3 x target_r
    got = [budget_schedule(config, t, b0, bT) for t in range(1, 11)]
    # Falling phase: steps 3..7 = total_step - tfinal, b = int((b0 - bT) (1 - (t - tinit) / (10 - 3 - 2))^3 + bT).
    by_hand = [(12, False), (12, False)] + [
        (int(9 * (1 - (t - 2) / 5) ** 3 + 3), t % 2 == 0) for t in range(3, 8)] + [(3, True)] * 3
    assert got == by_hand
    assert [b for b, _ in got] == [12, 12, 7, 4, 3, 3, 3, 3, 3, 3]
    allocator = hf.tuners.adalora.layer.RankAllocator.__new__(hf.tuners.adalora.layer.RankAllocator)
    allocator.peft_config = hf.AdaLoraConfig(init_r=4, target_r=1, tinit=2, tfinal=3, total_step=10, deltaT=2)
    allocator.init_bgt, allocator.target_bgt = b0, bT
    assert got == [allocator.budget_schedule(t) for t in range(1, 11)]


# ---- a whole training run against PEFT's -------------------------------------------------------------------

def test_training_via_hooks_follows_peft_update_and_allocate(tmp_path):
    cfg = dict(tinit=2, tfinal=3, deltaT=2, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    ours, theirs = _pair("llama", **cfg)
    x = model_inputs("llama")
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    ours.train(), theirs.train()
    for step in range(1, 13):  # past total_step=10: the final pattern keeps being applied
        loss_t = theirs(**x, labels=x["input_ids"]).loss  # PEFT adds the regulariser in forward
        loss_t.backward(), opt_t.step()
        theirs.base_model.update_and_allocate(step)  # what PEFT users call by hand
        opt_t.zero_grad()
        loss_o = ours(**x, labels=x["input_ids"]).loss + ours.extra_loss()  # what peftlab's loop does
        loss_o.backward(), opt_o.step()
        ours.on_step(step)
        opt_o.zero_grad()
        torch.testing.assert_close(loss_o, loss_t, **TIGHT)
        for (n, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, **TIGHT, msg=f"step {step}: {n}")
        pattern_t = theirs.peft_config["default"].rank_pattern
        expected = None if pattern_t is None else {k.replace(".default", ""): v for k, v in pattern_t.items()}
        assert ours.peft_config["default"].rank_pattern == expected, step
    final = ours.peft_config["default"].rank_pattern
    assert sum(map(sum, final.values())) == 2 * 6  # target_r x 6 modules
    assert any(not all(v) for v in final.values()), "the toy should prune something"
    # Both write the same file: same keys, shapes (pruned triplets left out), values and rank_pattern.
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(
        tmp_path / "theirs" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TIGHT, msg=k)
    ca, cb = (json.load(open(tmp_path / d / "adapter_config.json")) for d in ("ours", "theirs"))
    assert ca["rank_pattern"] == cb["rank_pattern"] and ca["peft_type"] == cb["peft_type"] == "ADALORA"
    for key in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                "lora_alpha", "r"):
        assert ca[key] == cb[key], key


# ---- `peftlab train` ---------------------------------------------------------------------------------------


def _run(model_dir, train_file, out, method, **train_opts):
    return run_config(model_dir, "causal_lm", train_file, out, method, **train_opts)


def _load_base(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_peftlab_train_prunes_to_the_budget_and_the_file_loads_in_peft_and_back(llama_dir, tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(sentences(40)))
    out = tmp_path / "run"
    method = {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "total_step": 12,
              "target_modules": ["q_proj", "v_proj"]}
    trainer = Trainer(_run(llama_dir, str(txt), out, method), log=lambda *_: None)
    trainer.fit()
    model = trainer.peft_model.eval()
    budget = 2 * 4  # target_r x (q_proj, v_proj of 2 layers)
    nonzero = sum(int((layer.lora_E["default"] != 0).sum()) for _, layer in adapter_layers(model, "default"))
    assert nonzero == budget
    folder = out / "adapter"
    config = json.load(open(folder / "adapter_config.json"))
    assert config["peft_type"] == "ADALORA" and sum(map(sum, config["rank_pattern"].values())) == budget
    tensors = load_file(folder / "adapter_model.safetensors")
    assert not any("ranknum" in k for k in tensors)  # PEFT does not save it either
    for key, keep in config["rank_pattern"].items():  # "<path>.lora_E": only the kept triplets are in the file
        path = key.removesuffix(".lora_E")
        assert tensors[f"base_model.model.{path}.lora_E"].shape == (sum(keep), 1)
        assert tensors[f"base_model.model.{path}.lora_A"].shape == (sum(keep), 32)
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_E")) == budget

    x = model_inputs("llama")
    expected = output_of(model, x)
    assert not torch.allclose(expected, output_of(_load_base(llama_dir), x), atol=1e-4), "training moved nothing"
    in_peft = hf.PeftModel.from_pretrained(_load_base(llama_dir), folder)
    torch.testing.assert_close(output_of(in_peft, x), expected, **TIGHT)
    back = peftlab.PeftModel.from_pretrained(_load_base(llama_dir), folder)
    torch.testing.assert_close(output_of(back, x), expected, **TIGHT)
    for path, layer in adapter_layers(back, "default"):  # built with the kept triplets only, as PEFT builds it
        assert layer.lora_A["default"].shape[0] == sum(config["rank_pattern"][f"{path}.lora_E"])
        assert float(layer.ranknum["default"]) == 4.0
    back.save_pretrained(tmp_path / "again")  # an adapter loaded pruned saves the same file again
    with pytest.warns(UserWarning, match="importance averages.*starts them from zero"):
        peftlab.PeftModel.from_pretrained(_load_base(llama_dir), folder, is_trainable=True)
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_pruned_adapter_saved_by_peft_loads_in_peftlab(tmp_path):
    theirs = hf.get_peft_model(tiny_llama(), hf.AdaLoraConfig(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=1,
                                                              task_type="CAUSAL_LM"))
    x = model_inputs("llama")
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    theirs.train()
    for step in range(1, 7):
        theirs(**x, labels=x["input_ids"]).loss.backward()
        opt.step()
        theirs.base_model.update_and_allocate(step)
        opt.zero_grad()
    theirs.eval()
    expected = output_of(theirs, x)
    theirs.save_pretrained(tmp_path)
    assert any(not all(v) for v in json.load(open(tmp_path / "adapter_config.json"))["rank_pattern"].values())
    ours = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(output_of(ours, x), expected, **TIGHT)


def test_a_pruned_file_onto_a_full_adapter_says_what_happened(tmp_path):
    ours, _ = _pair("llama")
    ours.peft_config["default"].rank_pattern = {
        f"{path}.lora_E": [True, False, True, False] for path, _ in adapter_layers(ours, "default")}
    ours.save_pretrained(tmp_path)
    fresh = peftlab.get_peft_model(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    with pytest.raises(peftlab.AdapterFileError, match="pruned triplets.*from_pretrained"):
        fresh.load_tensors("default", load_file(tmp_path / "adapter_model.safetensors"), str(tmp_path))


# ---- config errors ---------------------------------------------------------------------------------------------

def test_total_step_is_required_with_a_clear_error(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"total_step is not set.*method\.total_step"):
        AdaLoraConfig(init_r=4)
    with pytest.raises(ConfigError, match=r"method \(adalora\).*total_step is not set"):
        _run(llama_dir, "t.txt", tmp_path, {"name": "adalora", "init_r": 4})
    with pytest.raises(ConfigError, match="leave no steps"):
        AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ConfigError, match="target_r=9 is above init_r=4"):
        AdaLoraConfig(total_step=10, init_r=4, target_r=9)


def test_defaults_are_peft_s():
    ours, theirs = AdaLoraConfig(total_step=3), hf.AdaLoraConfig(total_step=3)
    for key in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "r",
                "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "init_lora_weights", "rank_pattern"):
        assert getattr(ours, key) == getattr(theirs, key), key
