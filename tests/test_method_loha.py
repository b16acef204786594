"""LoHa against HF PEFT (the reference) on tiny models; shared checks in tests/peft_parity.py.

Invariants: the same seed gives PEFT's factors bit for bit (Linear, Conv2d flat and CP) and the same logits, also
after random perturbation; files cross both ways (same keys, same config values, same logits); the layer computes
s (W1a W1b) ⊙ (W2a W2b); merge == unmerged forward and unmerge restores; GPT-2's Conv1D (which PEFT does not wrap)
computes the same update transposed; rank/module dropout act in training only, with PEFT's rescaling; training moves
the adapter only; the folder's conformance examples pass.
"""

from __future__ import annotations

import peft as hf
import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.methods.loha import LoHaConfig, LoHaLayer

from .conftest import BUILDERS, TinyConv, model_inputs, output_of
from .peft_parity import TIGHT, merge_matches, round_trips, same_init_and_logits, trains

WORDS = ("hada_",)
pytestmark = pytest.mark.usefixtures("quiet_warnings")

VARIANTS = {
    "qv": dict(r=4, alpha=6),
    "random-init-patterns": dict(r=3, init_weights=False, target_modules=["q_proj", "down_proj"],
                                 rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 5}),
    "all-linear": dict(r=2, target_modules="all-linear"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_init_and_logits_as_peft(variant):
    same_init_and_logits(LoHaConfig, hf.LoHaConfig, WORDS, **VARIANTS[variant])


@pytest.mark.parametrize("cfg", [dict(r=2, init_weights=False),
                                 dict(r=2, init_weights=False, use_effective_conv2d=True)], ids=["flat", "cp"])
def test_conv2d_same_as_peft(cfg):
    torch.manual_seed(3)
    a = peftlab.get_peft_model(TinyConv(), LoHaConfig(target_modules=["conv"], **cfg))
    torch.manual_seed(3)
    b = hf.get_peft_model(TinyConv(), hf.LoHaConfig(target_modules=["conv"], **cfg))
    layer = a.base_model.model.conv
    assert ("default" in layer.hada_t1) == cfg.get("use_effective_conv2d", False)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(x), b(x), **TIGHT)
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(x, layer.base_layer.weight + layer.delta_weight("default"),
                                         layer.base_layer.bias, padding=1)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["qv", "random-init-patterns"])
def test_files_cross_both_ways(variant, tmp_path):
    round_trips(LoHaConfig, hf.LoHaConfig, WORDS, tmp_path, **VARIANTS[variant])


def test_layer_computes_the_hadamard_product():
    model = peftlab.get_peft_model(BUILDERS["llama"](), LoHaConfig(r=3, alpha=7, init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, LoHaLayer)
    f = {k: t.detach() for k, t in layer.adapter_tensors("default").items()}
    assert f["hada_w1_a"].shape == (16, 3) and f["hada_w1_b"].shape == (3, 32)
    delta = (7 / 3) * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + delta).T, rtol=1e-5, atol=1e-5)
    # rank of a Hadamard product of two rank-3 matrices: up to 9 (here min(16, 32, 9) = 9), beyond LoRA's 3
    assert torch.linalg.matrix_rank(delta) > 3


def test_gpt2_conv1d_update_is_transposed_into_the_stored_weight():
    model = peftlab.get_peft_model(BUILDERS["gpt2"](), LoHaConfig(r=2, init_weights=False, task_type="CAUSAL_LM"))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.delta_weight("default").shape == layer.base_layer.weight.shape == (32, 96)
    merge_matches(model, "gpt2")


def test_merge_equals_unmerged_and_several_adapters():
    model = peftlab.get_peft_model(BUILDERS["llama"](), LoHaConfig(r=2, init_weights=False))
    model.add_adapter("other", LoHaConfig(r=3, init_weights=False, target_modules=["q_proj", "o_proj"]))
    x = model_inputs("llama")
    only_default = output_of(model, x)
    model.set_adapter("other")
    assert not torch.allclose(output_of(model, x), only_default)
    model.set_adapter("default")
    merge_matches(model)


def test_dropouts_act_in_training_only():
    model = peftlab.get_peft_model(BUILDERS["llama"](), LoHaConfig(r=2, init_weights=False, rank_dropout=0.5))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    exact = layer.update("default", training=False)
    torch.manual_seed(0)
    dropped = layer.update("default", training=True)
    rows = dropped.abs().sum(1) != 0
    assert 0 < rows.sum() < 32
    # kept rows are rescaled by 1 / kept fraction (PEFT's LoHa rule)
    torch.testing.assert_close(dropped[rows], exact[rows] * (32 / rows.sum()), rtol=1e-5, atol=1e-6)
    x = model_inputs("llama")
    skipped = peftlab.get_peft_model(BUILDERS["llama"](), LoHaConfig(r=2, init_weights=False, module_dropout=0.999))
    assert torch.allclose(output_of(skipped, x), output_of(skipped.eval(), x))  # eval: always applied
    skipped.train()
    with torch.no_grad():
        torch.testing.assert_close(skipped(**x).logits, output_of(BUILDERS["llama"](), x))  # train: skipped


def test_trains_adapter_only():
    trains(peftlab.get_peft_model(BUILDERS["llama"](), LoHaConfig(r=4, task_type="CAUSAL_LM")))


def test_bad_config_says_what_to_do():
    with pytest.raises(ConfigError, match="rank_dropout"):
        LoHaConfig(rank_dropout=1.5)
    with pytest.raises(ConfigError, match="init_weights"):
        LoHaConfig(init_weights="lycoris")  # LoKr's choice, not LoHa's

