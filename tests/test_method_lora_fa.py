"""LoRA-FA: LoRA with A frozen, and a custom backward that keeps only the r-dimensional A x.

Invariants checked:
- the forward is LoRA's formula W x + bias + s B A x, in training (the custom Function) and in eval;
- A is frozen (requires_grad False, no gradient), B trains; the model's trainable tensors are the B's only;
- the custom backward's dx, dB and dbias equal autograd's on the same graph (random inputs, fp32 to 1e-6 and
  fp64 gradcheck, odd shapes, nn.Linear and Conv1D layouts, with and without bias, through dropout);
- whole-model gradients equal those of a plain LoRA model whose A is frozen (llama, gpt2 with a trained bias);
- during the forward of an adapted layer nothing of the (batch, seq, in) input is saved for backward, unlike
  LoRA, and the saved-activation bytes are smaller than LoRA's;
- files are plain LoRA files: peftlab reads them back as `lora`, and a LoraFaConfig passed to from_pretrained
  continues LoRA-FA training (PEFT loading them with the same logits: tests/test_conformance.py's round trip).
"""

from __future__ import annotations

import copy
import json

import peft as hf
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftlab
from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.core.model import read_config
from peftlab.methods.lora_fa import LoraFaConfig, LoraFaFunction, LoraFaLinear

from .conftest import BUILDERS, model_inputs, output_of


pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


def fa_model(kind="llama", **cfg):
    cfg.setdefault("init_lora_weights", False)  # B random too, so the adapter changes the output
    cfg.setdefault("task_type", "CAUSAL_LM")
    return get_peft_model(BUILDERS[kind](), LoraFaConfig(**cfg))


def reference_lora(fa, kind="llama"):
    """A plain LoRA model with the same adapter weights and A frozen: autograd's own LoRA-FA."""
    cfg = fa.peft_config["default"]
    ref = get_peft_model(BUILDERS[kind](), LoraConfig(**{k: v for k, v in cfg.to_dict().items() if k != "peft_type"}))
    with torch.no_grad():
        for k, t in fa.adapter_tensors("default").items():
            ref.adapter_tensors("default")[k].copy_(t)
    for k, t in ref.adapter_tensors("default").items():
        if "lora_A" in k:
            t.requires_grad_(False)
    return ref


def fa_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraFaLinear)]


# ---- forward and what trains --------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_forward_is_the_lora_formula(train):
    model = fa_model(r=3, lora_alpha=5)
    model.train(train)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0), requires_grad=train)
    W, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ W.T + (5 / 3) * (x @ A.T) @ B.T
    with torch.set_grad_enabled(train):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_A_is_frozen_and_only_B_gets_gradients():
    model = fa_model(r=4)
    model.train()
    model(**model_inputs("llama")).logits.pow(2).mean().backward()
    layers = fa_layers(model)
    assert len(layers) == 4  # q_proj and v_proj in two layers
    for _, layer in layers:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert not A.requires_grad and A.grad is None
        assert B.requires_grad and B.grad is not None and B.grad.abs().sum() > 0
    assert set(model.trainable_tensors("default")) == {k for k in model.adapter_tensors("default") if "lora_B" in k}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n for n in trainable)


def test_A_stays_frozen_across_set_adapter_and_a_second_adapter():
    model = fa_model(r=4)
    model.add_adapter("other", LoraFaConfig(r=2, target_modules=["k_proj"]))
    model.set_adapter("other")
    model.set_adapter("default")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)


# ---- the custom backward equals autograd -----------------------------------------------------------------------


def _base(in_f, out_f, bias, conv1d, dtype, seed):
    torch.manual_seed(seed)
    layer = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f, bias=bias)
    if conv1d:
        nn.init.normal_(layer.weight, std=0.3)
        nn.init.normal_(layer.bias, std=0.3)
    layer = layer.to(dtype)
    layer.weight.requires_grad_(False)
    return layer


CASES = [  # (leading shape, in, out, r, bias, bias trains, conv1d)
    ((3, 5), 7, 11, 3, True, False, False),
    ((3, 5), 7, 11, 3, True, True, False),
    ((1, 1), 1, 1, 1, False, False, False),
    ((2, 3, 4), 13, 5, 6, True, True, False),    # three leading dims; r > out
    ((17,), 9, 2, 4, False, False, False),       # one leading dim
    ((4, 6), 10, 15, 2, True, False, True),      # Conv1D: weight (in, out)
    ((4, 6), 10, 15, 2, True, True, True),
]


@pytest.mark.parametrize("lead,in_f,out_f,r,bias,bias_trains,conv1d", CASES)
def test_custom_backward_equals_autograd_fp32(lead, in_f, out_f, r, bias, bias_trains, conv1d):
    base = _base(in_f, out_f, bias, conv1d, torch.float32, seed=in_f * out_f)
    if base.bias is not None:
        base.bias.requires_grad_(bias_trains)
    g = torch.Generator().manual_seed(r)
    x = torch.randn(*lead, in_f, generator=g, requires_grad=True)
    A = torch.randn(r, in_f, generator=g)
    B = torch.randn(out_f, r, generator=g, requires_grad=True)
    s = 0.37
    dy = torch.randn(*lead, out_f, generator=g)

    y = LoraFaFunction.apply(x, x, base, base.weight, base.bias, A, B, s, conv1d)
    wanted = [x, B] + ([base.bias] if bias_trains else [])
    got = torch.autograd.grad(y, wanted, dy)

    y_ref = base(x) + (F.linear(F.linear(x, A), B) * s)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the same ops: bit-identical forward
    expected = torch.autograd.grad(y_ref, wanted, dy)
    for name, a, b in zip(["dx", "dB", "dbias"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("conv1d", [False, True])
def test_custom_backward_passes_gradcheck_in_fp64(conv1d):
    base = _base(6, 4, True, conv1d, torch.float64, seed=1)
    base.bias.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    h = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)  # a separate branch input
    A = torch.randn(3, 6, dtype=torch.float64, generator=g)
    B = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, h, bias, B: LoraFaFunction.apply(x, h, base, base.weight, bias, A, B, 0.5, conv1d),
        (x, h, base.bias, B))


@pytest.mark.parametrize("kind,cfg", [
    ("llama", dict(r=4, lora_alpha=8)),
    ("llama", dict(r=3, target_modules="all-linear", use_rslora=True)),
    ("gpt2", dict(r=4, bias="lora_only")),  # Conv1D layout and a trained base bias
])
def test_model_gradients_equal_plain_lora_with_A_frozen(kind, cfg):
    fa = fa_model(kind, **cfg)
    ref = reference_lora(fa, kind)
    x = model_inputs(kind)
    for m in (fa, ref):
        m.train()
        torch.manual_seed(0)  # gpt2's own dropouts draw the same masks in both
        m(**x, labels=x["input_ids"]).loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    fa_grads = {n: p.grad for n, p in fa.named_parameters() if p.requires_grad}
    assert fa_grads.keys() == ref_grads.keys() and fa_grads
    for n in fa_grads:
        torch.testing.assert_close(fa_grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gradients_through_dropout_equal_autograd():
    """lora_dropout > 0: the same mask (same RNG draws) gives the same gradients as autograd's LoRA."""
    fa = fa_model(r=4, lora_dropout=0.3)
    ref = reference_lora(fa)
    x = model_inputs("llama")
    for m in (fa, ref):
        m.train()
        torch.manual_seed(11)
        m(**x, labels=x["input_ids"]).loss.backward()
    for (n, p), (_, q) in zip(fa.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_autocast_trains_close_to_fp32():
    fa = fa_model(r=4)
    ref = copy.deepcopy(fa)
    x = model_inputs("llama")
    fa.train(), ref.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fa(**x, labels=x["input_ids"]).loss.backward()
    ref(**x, labels=x["input_ids"]).loss.backward()
    for (n, p), (_, q) in zip(fa.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert p.grad.dtype == torch.float32
            assert torch.isfinite(p.grad).all()
            # bf16 keeps 8 bits of mantissa: agree to a few percent of the gradient's scale
            assert (p.grad - q.grad).norm() <= 0.05 * q.grad.norm(), n


# ---- what is saved for backward -------------------------------------------------------------------------------


def _saved_in_adapted_layers(model, x):
    """(tensors saved for backward while an adapted layer's forward runs, the inputs of those layers)."""
    state = {"inside": 0}
    saved, inputs = [], []
    hooks = []

    def enter(module, args):
        state["inside"] = 1
        inputs.append(args[0])

    def leave(module, args, output):
        state["inside"] = 0

    for _, layer in model.named_modules():
        if isinstance(layer, peftlab.core.layer.AdapterLayer):
            hooks.append(layer.register_forward_pre_hook(enter))
            hooks.append(layer.register_forward_hook(leave))

    def pack(t):
        if state["inside"]:
            saved.append(t)
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**x).logits.sum().backward()
    for h in hooks:
        h.remove()
    activations = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    return activations, inputs


def test_adapted_layers_save_only_the_rank_r_activation_not_the_input():
    x = {"input_ids": torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))}
    fa = fa_model(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    lora = get_peft_model(BUILDERS["llama"](), LoraConfig(r=4, init_lora_weights=False,
                                                         target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    fa.train(), lora.train()
    fa_saved, fa_inputs = _saved_in_adapted_layers(fa, x)
    lora_saved, lora_inputs = _saved_in_adapted_layers(lora, x)

    input_ptrs = {t.untyped_storage().data_ptr() for t in fa_inputs}
    assert not [t.shape for t in fa_saved if t.untyped_storage().data_ptr() in input_ptrs]
    assert all(t.shape == (2, 12, 4) for t in fa_saved), [t.shape for t in fa_saved]  # u = A x, r = 4
    assert len(fa_saved) == 8  # one u per adapted layer (4 targets x 2 layers)
    # LoRA keeps each layer's (2, 12, in) input for dA.
    lora_ptrs = {t.untyped_storage().data_ptr() for t in lora_inputs}
    assert any(t.untyped_storage().data_ptr() in lora_ptrs and t.shape[-1] in (32, 64) for t in lora_saved)

    def nbytes(ts):
        unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}
        return sum(unique.values())
    assert nbytes(fa_saved) == 8 * 2 * 12 * 4 * 4  # 8 layers x (2 x 12 x r=4) fp32
    assert nbytes(fa_saved) < nbytes(lora_saved) / 4


# ---- files ---------------------------------------------------------------------------------------------------


def test_files_are_plain_lora_files(tmp_path):
    """The file says LORA with LoraConfig's keys only, and peftlab reads it back as plain LoRA (PEFT loading it with
    the same logits is the conformance suite's round trip on lora_fa/examples.py)."""
    model = fa_model(r=4, lora_alpha=16)
    x = model_inputs("llama")
    expected = output_of(model, x)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA"
    assert set(written) <= set(hf.LoraConfig().to_dict())  # no key of ours beyond LoraConfig's
    # peftlab reads the file as plain LoRA: right for inference (same logits).
    assert type(read_config(str(tmp_path))) is LoraConfig
    back = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    torch.testing.assert_close(output_of(back, x), expected, rtol=0, atol=0)


def test_peft_lora_file_continues_as_lora_fa_when_the_config_says_so(tmp_path):
    peft_side = hf.get_peft_model(BUILDERS["llama"](), hf.LoraConfig(r=4, init_lora_weights=False,
                                                                     task_type="CAUSAL_LM"))
    x = model_inputs("llama")
    expected = output_of(peft_side, x)
    peft_side.save_pretrained(tmp_path)
    fields = {k: v for k, v in read_config(str(tmp_path)).to_dict().items() if k != "peft_type"}
    model = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path, is_trainable=True, config=LoraFaConfig(**fields))
    torch.testing.assert_close(output_of(model, x), expected, rtol=1e-5, atol=1e-6)
    assert fa_layers(model) and not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".lora_B." in n)


def test_non_linear_targets_are_refused_with_what_to_do():
    with pytest.raises(peftlab.ConfigError, match=r"'model.embed_tokens' is a Embedding, which lora_fa cannot adapt"):
        fa_model(target_modules=["embed_tokens"])
