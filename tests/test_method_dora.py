"""DoRA: the formula written out by hand, the detached norm, merging, and parity with HF PEFT's
`LoraConfig(use_dora=True)` (the reference, used only here).

Invariants checked:
- forward = m * (W + s B A) x / ||W + s B A||_row + b on Linear, Conv1D, Embedding and Conv2d, and PEFT's logits
  (eval, and train mode with dropout: same logits and same gradients of A, B, m) on identical weights;
- the norm is a constant for autograd: gradients equal a hand-written formula with n.detach(), and differ from
  the one without (so the test would catch a norm left in the graph);
- m starts at ||W||_row (identity at init);
- merge = PEFT's merge, unmerge restores W, also with two DoRA adapters merged one after the other;
- files cross both ways (peftlab -> PEFT, PEFT -> peftlab) with the same logits, keys and config values.
"""

from __future__ import annotations

import json

import peft as hf
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

import peftlab
from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.core.config import ConfigError
from peftlab.methods.dora import DoraConfig, DoraConv2d, DoraEmbedding, DoraLinear

from .conftest import TinyConv, model_inputs, tiny_gpt2, tiny_llama
from .peft_parity import TASK, TIGHT, build, file_shapes, logits


# PEFT warns about Conv1D fan_in_fan_out and saved embedding layers
pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


# (model kind, config kwargs shared by both libraries)
VARIANTS = {
    "llama-qv": ("llama", dict(r=4, lora_alpha=8)),
    "llama-all-linear-rslora": ("llama", dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    "llama-embedding": ("llama", dict(r=2, target_modules=["embed_tokens", "q_proj"])),
    "llama-rank-alpha-pattern": ("llama", dict(r=4, target_modules=["q_proj", "down_proj"],
                                               rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 32})),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"])),
    "gpt2-bias-lora_only": ("gpt2", dict(r=2, bias="lora_only")),
    "bert-seq-cls": ("bert", dict(r=4)),
    "t5": ("t5", dict(r=2, target_modules=["q", "v", "wo"])),
    "conv2d": ("conv", dict(r=2, target_modules=["conv"])),
}


def perturb_peft(theirs, adapter: str = "default", seed: int = 7) -> None:
    """Add noise to every tensor of PEFT's adapter `adapter` (A, B, magnitudes: m / n != 1 everywhere; trained
    biases and task-head copies too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            owned = f".{adapter}." in name or name.endswith(f".{adapter}")
            if owned or (adapter == "default" and p.requires_grad):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def copy_peft_into_ours(theirs, ours, adapter: str = "default") -> None:
    """Copy PEFT's adapter tensors into ours through the file keys both libraries share."""
    state = get_peft_model_state_dict(theirs, adapter_name=adapter)
    mine = ours.adapter_tensors(adapter)
    assert set(mine) <= set(state), sorted(set(mine) - set(state))
    with torch.no_grad():
        for key, t in mine.items():
            t.copy_(state[key])


def make_pair(kind: str, **cfg):
    """(peftlab DoRA model, PEFT DoRA model) on the same base, PEFT's perturbed adapter copied into ours."""
    cfg.setdefault("init_lora_weights", False)
    if kind in TASK:
        cfg.setdefault("task_type", TASK[kind])
    theirs = hf.get_peft_model(build(kind), hf.LoraConfig(use_dora=True, **cfg))
    ours = get_peft_model(build(kind), DoraConfig(**cfg))
    perturb_peft(theirs)
    copy_peft_into_ours(theirs, ours)
    return ours, theirs


# ---- the formula ---------------------------------------------------------------------------------------------


def _dora_layer(model, path):
    layer = model.base_model.model.get_submodule(path)
    assert isinstance(layer, (DoraLinear, DoraEmbedding, DoraConv2d))
    return layer


def _randomise(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.adapter_tensors("default").values():
            t.add_(torch.randn(t.shape, generator=g) * scale)


def test_linear_matches_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 7))
    W, b = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    model = get_peft_model(net, DoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    layer = _dora_layer(model, "0")
    torch.testing.assert_close(layer.magnitude("default"), W.norm(dim=1), rtol=0, atol=0)  # m = ||W||_row
    _randomise(model)
    A, B, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.magnitude("default")
    V = W + 2.0 * B @ A  # (7, 10)
    x = torch.randn(4, 10)
    expected = (x @ V.T) * (m / V.norm(dim=1)) + b
    torch.testing.assert_close(model(x), expected)


def test_conv1d_matches_formula():
    """GPT-2's Conv1D stores W as (in, out): V = W^T + s B A (out, in), y = (m / ||V||_row) * (x V^T) + b."""
    model = get_peft_model(tiny_gpt2(), DoraConfig(r=2, lora_alpha=4))
    _randomise(model)
    layer = _dora_layer(model, "transformer.h.0.attn.c_attn")
    assert layer.fan_in_fan_out and layer.magnitude("default").shape == (96,)
    W, b = layer.base_layer.weight, layer.base_layer.bias  # (32, 96), (96,)
    A, B, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.magnitude("default")
    V = W.T + 2.0 * B @ A
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), (x @ V.T) * (m / V.norm(dim=1)) + b)


def test_embedding_matches_formula():
    """W (vocab, dim): one norm per embedding dimension over the vocabulary, m (dim,)."""
    model = get_peft_model(tiny_llama(), DoraConfig(r=2, lora_alpha=2, target_modules=["embed_tokens"]))
    _randomise(model)
    layer = _dora_layer(model, "model.embed_tokens")
    W = layer.base_layer.weight  # (96, 32)
    A, B, m = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"], layer.magnitude("default")
    V = W + (B @ A).T  # (vocab, dim)
    ids = torch.tensor([[1, 5, 9], [3, 3, 0]])
    torch.testing.assert_close(layer(ids), V[ids] * (m / V.norm(dim=0)))


def test_conv2d_matches_formula():
    model = get_peft_model(TinyConv(), DoraConfig(r=2, lora_alpha=4, target_modules=["conv"]))
    _randomise(model)
    layer = _dora_layer(model, "conv")
    W, b = layer.base_layer.weight, layer.base_layer.bias  # (8, 3, 3, 3)
    A, B, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.magnitude("default")
    assert m.shape == (1, 8, 1, 1)  # PEFT's shape
    V = W + 2.0 * (B.flatten(1) @ A.flatten(1)).reshape(W.shape)
    factor = m.flatten() / V.flatten(1).norm(dim=1)  # (out,)
    x = torch.randn(2, 3, 6, 6)
    expected = nn.functional.conv2d(x, V * factor[:, None, None, None], b, padding=1)
    torch.testing.assert_close(layer(x), expected)


def test_dropout_rescales_the_base_part_on_the_dropped_input():
    """Training with lora_dropout: y = base(x) + (m/n - 1) W x_d + (m/n) s B A x_d, x_d = dropout(x) (PEFT's)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 7))
    model = get_peft_model(net, DoraConfig(r=3, lora_alpha=3, lora_dropout=0.5, target_modules=["0"]))
    _randomise(model)
    model.train()
    layer = _dora_layer(model, "0")
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.magnitude("default")
    x = torch.randn(4, 10)
    torch.manual_seed(3)
    y = model(x)
    torch.manual_seed(3)
    x_d = nn.functional.dropout(x, 0.5, training=True)
    scale = m / (W + B @ A).norm(dim=1)
    expected = x @ W.T + b + ((scale - 1) * (x_d @ W.T) + scale * (x_d @ A.T @ B.T))
    torch.testing.assert_close(y, expected)


def test_the_norm_gets_no_gradient():
    """The gradients of A, B and m are those of the formula with ||W + s B A|| detached (DoRA sec. 4.3, PEFT), and
    differ measurably from the gradients with the norm left in the graph."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 9))
    model = get_peft_model(net, DoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    _randomise(model, scale=0.3)
    layer = _dora_layer(model, "0")
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.magnitude("default")]
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    x, target = torch.randn(5, 12), torch.randn(5, 9)

    def loss_of(y):
        return (y - target).pow(2).mean()

    ours = torch.autograd.grad(loss_of(model(x)), params)

    def hand(detach: bool):
        A, B, m = (p.detach().clone().requires_grad_(True) for p in params)
        V = W + 2.0 * B @ A
        n = V.norm(dim=1)
        n = n.detach() if detach else n
        return torch.autograd.grad(loss_of((x @ V.T) * (m / n) + b), (A, B, m))

    detached, attached = hand(True), hand(False)
    for g_ours, g_hand in zip(ours, detached):
        torch.testing.assert_close(g_ours, g_hand)
    # The check above can tell the two apart: A's and B's gradients change when n stays in the graph (m's do not:
    # n does not depend on m).
    for g_ours, g_attached in zip(ours[:2], attached[:2]):
        assert (g_ours - g_attached).abs().max() > 1e-3 * g_attached.abs().max()


def test_identity_at_init_and_magnitude_is_the_row_norm():
    base = tiny_gpt2()
    reference = tiny_gpt2()
    model = get_peft_model(base, DoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    x = model_inputs("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, reference(**x).logits, rtol=0, atol=0)
    layer = _dora_layer(model, "transformer.h.1.attn.c_proj")
    torch.testing.assert_close(layer.magnitude("default"), layer.base_layer.weight.norm(dim=0), rtol=0, atol=0)


# ---- parity with PEFT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_logits_as_peft(variant):
    kind, cfg = VARIANTS[variant]
    ours, theirs = make_pair(kind, **cfg)
    with torch.no_grad():
        expected = logits(theirs, kind)
        assert not torch.allclose(expected, logits(build(kind), kind), atol=1e-4), "DoRA should change the output"
        torch.testing.assert_close(logits(ours, kind), expected, **TIGHT)


@pytest.mark.parametrize("variant", ["llama-qv", "gpt2-conv1d", "conv2d"])
def test_same_logits_and_gradients_as_peft_in_training_with_dropout(variant):
    """Train mode with lora_dropout: the same dropout masks (same seed, same draw order) give PEFT's logits, and
    backward gives PEFT's gradients for A, B and m."""
    kind, cfg = VARIANTS[variant]
    ours, theirs = make_pair(kind, lora_dropout=0.3, **cfg)
    ours.train(), theirs.train()
    torch.manual_seed(11)
    y_ours = logits(ours, kind)
    torch.manual_seed(11)
    y_theirs = logits(theirs, kind)
    torch.testing.assert_close(y_ours, y_theirs, **TIGHT)
    y_ours.pow(2).mean().backward()
    y_theirs.pow(2).mean().backward()
    grads_theirs = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    named_ours = dict(ours.named_parameters())
    grads_ours = {n.replace(".default", ""): p.grad for n, p in named_ours.items() if p.grad is not None}
    assert grads_ours.keys() == grads_theirs.keys()
    for n in grads_ours:
        torch.testing.assert_close(grads_ours[n], grads_theirs[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("variant", ["llama-qv", "gpt2-conv1d", "llama-embedding", "conv2d"])
def test_merge_and_unload_equals_peft(variant):
    kind, cfg = VARIANTS[variant]
    ours, theirs = make_pair(kind, **cfg)
    with torch.no_grad():
        unmerged = logits(ours, kind)
        merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
        torch.testing.assert_close(logits(merged_ours, kind), unmerged, rtol=1e-5, atol=1e-5)
    sd_ours, sd_theirs = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for k in sd_ours:
        torch.testing.assert_close(sd_ours[k], sd_theirs[k], **TIGHT, msg=k)


def test_two_adapters_merged_in_turn_equal_both_active_and_unmerge_restores():
    """Each DoRA adapter's norm is taken of the unmerged W, in forward and in merge alike, so merging two active
    adapters one after the other computes what the two compute unmerged (and what PEFT computes)."""
    ours, theirs = make_pair("llama", r=2)
    extra = dict(r=3, lora_alpha=5, target_modules=["q_proj"], init_lora_weights=False)
    ours.add_adapter("other", DoraConfig(**extra))
    theirs.add_adapter("other", hf.LoraConfig(use_dora=True, **extra))
    perturb_peft(theirs, "other", seed=1)
    copy_peft_into_ours(theirs, ours, "other")
    ours.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    base_before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        both = logits(ours, "llama")
        torch.testing.assert_close(both, logits(theirs, "llama"), **TIGHT)
        ours.merge_adapter()
        theirs.merge_adapter()
        torch.testing.assert_close(logits(ours, "llama"), both, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(theirs, "llama"), both, rtol=1e-5, atol=1e-5)
        ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in base_before:
            torch.testing.assert_close(p, base_before[n], rtol=1e-6, atol=1e-6, msg=n)


def test_safe_merge_refuses_nan_and_leaves_the_weight():
    model = get_peft_model(tiny_llama(), DoraConfig(r=2, target_modules=["q_proj"]))
    layer = _dora_layer(model, "model.layers.0.self_attn.q_proj")
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.magnitude("default")[3] = float("nan")
    with pytest.raises(ValueError, match=r"hold NaN or inf values.*allow_non_finite=True"):  # model-level guard first
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged
    # Past that guard (its debugging escape), safe_merge still checks the merged weight itself.
    with pytest.raises(ValueError, match=r"Merging DoRA adapter 'default' would put NaN/inf into Linear's weight; "
                                         r"the base weight was left unchanged"):
        model.merge_adapter(safe_merge=True, allow_non_finite=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


# ---- files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama-qv", "gpt2-bias-lora_only", "llama-embedding", "bert-seq-cls", "conv2d",
                                     "t5"])
def test_files_cross_both_ways_with_same_logits(variant, tmp_path):
    kind, cfg = VARIANTS[variant]
    ours, theirs = make_pair(kind, **cfg)
    with torch.no_grad():
        expected = logits(theirs, kind)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")

    ours_file = file_shapes(tmp_path / "ours")
    assert ours_file == file_shapes(tmp_path / "peft")
    assert any(k.endswith(".lora_magnitude_vector") for k in ours_file)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["use_dora"] is True

    loaded_by_peft = hf.PeftModel.from_pretrained(build(kind), tmp_path / "ours")
    assert loaded_by_peft.peft_config["default"].use_dora is True
    loaded_by_us = PeftModel.from_pretrained(build(kind), tmp_path / "peft")
    assert type(loaded_by_us.peft_config["default"]) is DoraConfig
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded_by_peft, kind), expected, **TIGHT)
        torch.testing.assert_close(logits(loaded_by_us, kind), expected, **TIGHT)


def test_in_model_parameter_names_are_peft_names():
    ours, theirs = make_pair("llama", r=2)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert any(k.endswith("lora_magnitude_vector.default.weight") for k in ours.state_dict())


def test_a_plain_lora_file_stays_lora_and_a_dora_file_is_dora(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(r=2)).save_pretrained(tmp_path / "lora")
    get_peft_model(tiny_llama(), DoraConfig(r=2)).save_pretrained(tmp_path / "dora")
    assert type(PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").peft_config["default"]) is LoraConfig
    assert type(PeftModel.from_pretrained(tiny_llama(), tmp_path / "dora").peft_config["default"]) is DoraConfig
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["use_dora"] is False  # as PEFT writes
    assert peftlab.get_method("dora").config_cls is DoraConfig


def test_use_dora_false_is_refused():
    with pytest.raises(ConfigError, match=r"DoraConfig\.use_dora=False is not valid.*use LoraConfig"):
        DoraConfig(use_dora=False)


def test_dora_and_lora_cannot_share_a_module():
    model = get_peft_model(tiny_llama(), DoraConfig(r=2))
    with pytest.raises(ConfigError, match="already carries a DoraLinear adapter"):
        model.add_adapter("plain", LoraConfig(r=2))


def test_pissa_init_under_dora_matches_peft():
    """DoRA's magnitude is taken after LoRA's init: with PiSSA, m = ||W_res + s B A|| = ||W||, as in PEFT."""
    cfg = dict(r=2, lora_alpha=4, init_lora_weights="pissa")
    ours = get_peft_model(tiny_llama(), DoraConfig(**cfg))
    theirs = hf.get_peft_model(tiny_llama(), hf.LoraConfig(use_dora=True, **cfg))
    state = get_peft_model_state_dict(theirs)
    for key, t in ours.adapter_tensors("default").items():
        torch.testing.assert_close(t, state[key], rtol=1e-4, atol=1e-5, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, "llama"), logits(theirs, "llama"), **TIGHT)
        torch.testing.assert_close(logits(ours, "llama"), logits(tiny_llama(), "llama"), rtol=1e-4, atol=1e-4)
