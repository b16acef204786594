"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) against the paper's equation, on tiny models.

HF PEFT has no such method, so the reference is the equation out = h + W_up act(W_down h + b_down) + b_up written
here by hand: per layer, and for a whole model as forward hooks on the plain base model's sublayer outputs.

Invariants checked:
- identity at init (W_up, b_up = 0);
- each layer and the whole model compute the equation with random non-zero weights, for every non-linearity;
- "houlsby" adapts the attention and MLP output projections, "pfeiffer" the MLP's only, on llama, gpt2, bert, t5
  (BERT's attention.output.dense is not taken for the MLP's output.dense), and the table holds on every listed
  architecture; an explicit target_modules overrides the placement;
- it trains: loss falls, the adapter moves, the base stays;
- save -> load reproduces tensors and logits; file keys are base_model.model.<path>.adapter_{down,up}.{weight,bias};
- parameters per adapter = 2 d m + d + m;
- bad values are refused with a clear message (reduction_factor, non_linearity, placement), and so is merging.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab.core.config import ConfigError
from peftlab.methods.bottleneck import PLACEMENTS, BottleneckConfig, BottleneckLinear

from .conftest import BUILDERS, model_inputs, output_of

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}

# The paper's non-linearities, written out independently of torch.nn's modules.
ACT = {
    "relu": lambda z: z.clamp_min(0),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "tanh": lambda z: (torch.exp(2 * z) - 1) / (torch.exp(2 * z) + 1),
}


def ours(kind="llama", **cfg):
    cfg.setdefault("task_type", TASK[kind])
    cfg.setdefault("reduction_factor", 4)
    return peftlab.get_peft_model(BUILDERS[kind](), BottleneckConfig(**cfg))


def randomise(model, adapter="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(model.adapter_tensors(adapter).items()):
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def adapted(model):
    return {p: m for p, m in model.base_model.model.named_modules() if isinstance(m, BottleneckLinear)}


def reference(h, down_w, down_b, up_w, up_b, act):
    """out = h + W_up act(W_down h + b_down) + b_up (Houlsby et al. 2019, Fig. 2), h (..., d)."""
    return h + ACT[act](h @ down_w.T + down_b) @ up_w.T + up_b


# ---- identity and the equation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_identity_at_init_with_zero_up_projection(kind):
    model, x = ours(kind), model_inputs(kind)
    torch.testing.assert_close(output_of(model, x), output_of(BUILDERS[kind](), x), rtol=0, atol=0)
    for lay in adapted(model).values():
        up, down = lay.adapter_up["default"], lay.adapter_down["default"]
        assert torch.all(up.weight == 0) and torch.all(up.bias == 0) and torch.all(down.bias == 0)
        assert down.weight.abs().sum() > 0  # so the first step moves W_up


@pytest.mark.parametrize("act", sorted(ACT))
def test_layer_computes_the_paper_equation(act):
    model = ours("llama", non_linearity=act)
    randomise(model)
    lay = adapted(model)["model.layers.1.self_attn.o_proj"]
    down, up = lay.adapter_down["default"], lay.adapter_up["default"]
    assert down.weight.shape == (8, 32) and up.weight.shape == (32, 8)  # d = 32, m = 32 / 4
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    h = x @ lay.base_layer.weight.T
    torch.testing.assert_close(lay(x), reference(h, down.weight, down.bias, up.weight, up.bias, act),
                               rtol=1e-5, atol=1e-6)


def test_conv1d_layer_computes_the_paper_equation_on_its_output():
    model = ours("gpt2", non_linearity="gelu")
    randomise(model)
    lay = adapted(model)["transformer.h.0.mlp.c_proj"]  # Conv1D 128 -> 32: h = x W + b, W (in, out)
    down, up = lay.adapter_down["default"], lay.adapter_up["default"]
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(2))
    h = x @ lay.base_layer.weight + lay.base_layer.bias
    torch.testing.assert_close(lay(x), reference(h, down.weight, down.bias, up.weight, up.bias, "gelu"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,placement,act", [("llama", "houlsby", "silu"), ("gpt2", "pfeiffer", "tanh"),
                                                ("bert", "houlsby", "relu"), ("t5", "houlsby", "gelu")])
def test_whole_model_equals_forward_hooks_applying_the_equation(kind, placement, act):
    model = ours(kind, placement=placement, non_linearity=act)
    randomise(model)
    plain = BUILDERS[kind]()
    if kind == "bert":  # the new head is a trained copy in modules_to_save: give the plain model the same head
        plain.classifier.load_state_dict(model.base_model.model.classifier.modules_to_save["default"].state_dict())
    weights = {p: (m.adapter_down["default"].weight, m.adapter_down["default"].bias, m.adapter_up["default"].weight,
                   m.adapter_up["default"].bias) for p, m in adapted(model).items()}
    for path, w in weights.items():
        plain.get_submodule(path).register_forward_hook(lambda mod, inp, out, w=w: reference(out, *w, act))
    x = model_inputs(kind)
    expected = output_of(plain, x)
    assert not torch.allclose(expected, output_of(BUILDERS[kind](), x), atol=1e-3)
    torch.testing.assert_close(output_of(model, x), expected, rtol=1e-5, atol=1e-5)


def test_several_adapters_stack_one_after_the_other():
    model = ours("llama", reduction_factor=8)
    model.add_adapter("second", BottleneckConfig(reduction_factor=4, non_linearity="tanh"))
    model.set_adapter(["default", "second"])
    randomise(model, "default", seed=0)
    randomise(model, "second", seed=1)
    lay = adapted(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    t1, t2 = lay.adapter_tensors("default"), lay.adapter_tensors("second")
    h = x @ lay.base_layer.weight.T
    first = reference(h, t1["adapter_down.weight"], t1["adapter_down.bias"], t1["adapter_up.weight"],
                      t1["adapter_up.bias"], "relu")
    expected = reference(first, t2["adapter_down.weight"], t2["adapter_down.bias"], t2["adapter_up.weight"],
                         t2["adapter_up.bias"], "tanh")
    torch.testing.assert_close(lay(x), expected, rtol=1e-5, atol=1e-6)


def test_dropout_acts_on_the_adapter_branch_in_training_only():
    model = ours("llama", adapter_dropout=0.5)
    randomise(model)
    lay = adapted(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    lay.eval()
    t = lay.adapter_tensors("default")
    h = x @ lay.base_layer.weight.T
    torch.testing.assert_close(lay(x), reference(h, t["adapter_down.weight"], t["adapter_down.bias"],
                                                 t["adapter_up.weight"], t["adapter_up.bias"], "relu"))
    lay.train()
    torch.manual_seed(0)
    branch = lay(x) - h
    assert (branch == 0).float().mean() > 0.2  # about half the branch's entries dropped; h itself never is


# ---- placement ------------------------------------------------------------------------------------------


EXPECTED = {
    ("llama", "houlsby"): [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.o_proj", "mlp.down_proj")],
    ("llama", "pfeiffer"): [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)],
    ("gpt2", "houlsby"): [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_proj", "mlp.c_proj")],
    ("gpt2", "pfeiffer"): [f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)],
    ("bert", "houlsby"): [f"bert.encoder.layer.{i}.{m}" for i in (0, 1) for m in ("attention.output.dense",
                                                                                 "output.dense")],
    ("bert", "pfeiffer"): [f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)],
    ("t5", "houlsby"): [f"encoder.block.{i}.layer.{j}.{m}" for i in (0, 1) for j, m in
                        ((0, "SelfAttention.o"), (1, "DenseReluDense.wo"))] +
                       [f"decoder.block.{i}.layer.{j}.{m}" for i in (0, 1) for j, m in
                        ((0, "SelfAttention.o"), (1, "EncDecAttention.o"), (2, "DenseReluDense.wo"))],
    ("t5", "pfeiffer"): [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in (0, 1)] +
                        [f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in (0, 1)],
}


@pytest.mark.parametrize("kind,placement", sorted(EXPECTED))
def test_placement_picks_the_sublayer_outputs(kind, placement):
    model = ours(kind, placement=placement)
    assert sorted(adapted(model)) == sorted(EXPECTED[kind, placement])


def test_placement_table_holds_on_every_listed_architecture():
    from transformers import AutoConfig, AutoModel

    from peftlab.core.targets import matches

    for model_type, table in PLACEMENTS.items():
        if model_type in ("gpt2", "gpt_bigcode"):
            size = dict(n_embd=32, n_layer=1, n_head=4)
        elif model_type in ("t5", "mt5"):
            size = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
        else:
            size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8)
        with torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.for_model(model_type, vocab_size=64, **size))
        names = [n for n, _ in model.named_modules()]
        found = {p: [n for n in names if matches(n, t) and not matches(n, e)] for p, (t, e) in table.items()}
        # One block: attention output + MLP output (t5: encoder self-attn + MLP, decoder self-attn, cross-attn, MLP).
        seq2seq = model_type in ("t5", "mt5")
        assert len(found["houlsby"]) == (5 if seq2seq else 2), (model_type, found)
        assert len(found["pfeiffer"]) == (2 if seq2seq else 1), (model_type, found)
        assert set(found["pfeiffer"]) < set(found["houlsby"]), (model_type, found)
        assert all(n.endswith(("down_proj", "mlp.c_proj", "layer.0.output.dense", "wo")) for n in found["pfeiffer"])


def test_explicit_targets_override_the_placement_and_user_excludes_are_kept():
    model = ours("llama", placement="pfeiffer", target_modules=["q_proj"])
    assert sorted(adapted(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    model = ours("bert", placement="pfeiffer", exclude_modules=["bert.encoder.layer.0.output.dense"])
    assert sorted(adapted(model)) == ["bert.encoder.layer.1.output.dense"]
    model = ours("bert", placement="pfeiffer", exclude_modules=r".*layer\.1\..*")
    assert sorted(adapted(model)) == ["bert.encoder.layer.0.output.dense"]


# ---- training, files, counts ------------------------------------------------------------------------------------


def test_trains_adapter_moves_base_stays():
    model = ours("llama")
    model.train()
    x = model_inputs("llama")
    owned = {id(t) for t in model.adapter_tensors("default").values()}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in owned}
    before = {k: t.detach().clone() for k, t in model.adapter_tensors("default").items()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == owned
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(**x, labels=x["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = model.adapter_tensors("default")
    assert all(not torch.equal(after[k], before[k]) for k in before), "every adapter tensor should move"
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in base.items()), "base weights must not change"


def test_save_load_round_trip_with_our_keys(tmp_path):
    model = ours("gpt2", placement="pfeiffer", non_linearity="silu", reduction_factor=8)
    randomise(model)
    x = model_inputs("gpt2")
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.transformer.h.{i}.mlp.c_proj.adapter_{p}.{t}"
                    for i in (0, 1) for p in ("down", "up") for t in ("weight", "bias")}
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["placement"] == "pfeiffer" and cfg["non_linearity"] == "silu"
    assert cfg["reduction_factor"] == 8 and cfg["target_modules"] == ["mlp.c_proj"]
    loaded = peftlab.PeftModel.from_pretrained(BUILDERS["gpt2"](), tmp_path)
    assert isinstance(loaded.peft_config["default"], BottleneckConfig)
    saved, back = model.adapter_tensors("default"), loaded.adapter_tensors("default")
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    torch.testing.assert_close(output_of(loaded, x), output_of(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("kind,placement,rf,adapters", [("llama", "houlsby", 4, 4), ("llama", "pfeiffer", 2, 2),
                                                         ("gpt2", "houlsby", 8, 4), ("t5", "houlsby", 16, 10)])
def test_parameter_count_is_2dm_plus_d_plus_m_per_adapter(kind, placement, rf, adapters):
    model = ours(kind, placement=placement, reduction_factor=rf, task_type=None)
    d = 32  # every tiny model's hidden size
    m = d // rf
    assert len(adapted(model)) == adapters
    for lay in adapted(model).values():
        assert sum(t.numel() for t in lay.adapter_tensors("default").values()) == 2 * d * m + d + m
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == adapters * (2 * d * m + d + m)


# ---- errors ---------------------------------------------------------------------------------------------


def test_reduction_factor_that_does_not_divide_d_is_refused():
    with pytest.raises(ConfigError, match=r"reduction_factor=5 does not divide the output size d=32 of "
                                          r"'model.layers.0.self_attn.o_proj'.*divisor of 32"):
        ours("llama", reduction_factor=5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(reduction_factor=0), r"reduction_factor=0 is not valid; it must be an integer >= 1"),
    (dict(reduction_factor=2.5), r"reduction_factor=2.5 is not valid; it must be an integer >= 1"),
    (dict(non_linearity="swish"), r"non_linearity='swish' is not valid; use one of: 'relu', 'gelu', 'silu', 'tanh'"),
    (dict(placement="after_attention"), r"placement='after_attention' is not valid; use one of: 'houlsby', 'pfeiffer'"),
    (dict(adapter_dropout=1.0), r"adapter_dropout=1.0 is not valid"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BottleneckConfig(**kwargs)


def test_merging_is_refused_and_changes_nothing():
    model = ours("llama")
    randomise(model)
    x = model_inputs("llama")
    expected = output_of(model, x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    torch.testing.assert_close(output_of(model, x), expected, rtol=0, atol=0)
    lay = next(iter(adapted(model).values()))
    with pytest.raises(NotImplementedError, match="non-linear act"):
        lay.delta_weight("default")


def test_unknown_model_type_asks_for_target_modules():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(ConfigError, match=r"no placement table for model_type=None.*target_modules="):
        peftlab.get_peft_model(model, BottleneckConfig(reduction_factor=4))
    wrapped = peftlab.get_peft_model(model, BottleneckConfig(reduction_factor=4, target_modules=["2"]))
    assert isinstance(wrapped.base_model.model[2], BottleneckLinear)
