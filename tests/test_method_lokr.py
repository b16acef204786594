"""LoKr against HF PEFT (the reference) on tiny models; shared checks in tests/peft_parity.py.

Invariants: `factorization` is PEFT's split for every size and factor; the same seed gives PEFT's factors bit for
bit (full or decomposed W1/W2, the three init modes, Conv2d flat and CP) and the same logits, also after random
perturbation; files cross both ways; the layer computes s W1 ⊗ W2; merge == unmerged forward; GPT-2's Conv1D (which
PEFT does not wrap) gets the update transposed; rank dropout rescales only with rank_dropout_scale; training moves
the adapter only; the folder's conformance examples pass.
"""

from __future__ import annotations

import peft as hf
import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization

import peftlab
from peftlab.core.config import ConfigError
from peftlab.methods.lokr import LoKrConfig, LoKrLayer, factorization

from .conftest import BUILDERS, TinyConv
from .peft_parity import TIGHT, merge_matches, round_trips, same_init_and_logits, trains

WORDS = ("lokr_",)
pytestmark = pytest.mark.usefixtures("quiet_warnings")

VARIANTS = {
    "qv": dict(r=4, alpha=6),  # 32 = 4 x 8, r=4 < 8/2 is false: W2 full
    "decomposed-w2": dict(r=1, alpha=3, target_modules=["q_proj", "down_proj"]),  # r < max(b, d)/2: W2 = W2a W2b
    "decompose-both-factor-lycoris": dict(r=1, decompose_both=True, decompose_factor=2, init_weights="lycoris",
                                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "random-init-patterns": dict(r=2, init_weights=False, rank_pattern={"v_proj": 1}, alpha_pattern={"q_proj": 5}),
}


def test_factorization_is_peft_split():
    for n in range(1, 400):
        for f in (-1, 1, 2, 3, 4, 8, 16, 33):
            assert factorization(n, f) == peft_factorization(n, f), (n, f)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_init_and_logits_as_peft(variant):
    same_init_and_logits(LoKrConfig, hf.LoKrConfig, WORDS, **VARIANTS[variant])


@pytest.mark.parametrize("cfg", [dict(r=1, init_weights=False),
                                 dict(r=1, init_weights=False, use_effective_conv2d=True),
                                 dict(r=8, init_weights=False)], ids=["flat", "cp", "full-w2"])
def test_conv2d_same_as_peft(cfg):
    torch.manual_seed(3)
    a = peftlab.get_peft_model(TinyConv(), LoKrConfig(target_modules=["conv"], **cfg))
    torch.manual_seed(3)
    b = hf.get_peft_model(TinyConv(), hf.LoKrConfig(target_modules=["conv"], **cfg))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(x), b(x), **TIGHT)
    layer = a.base_model.model.conv
    assert ("default" in layer.lokr_t2) == cfg.get("use_effective_conv2d", False)


@pytest.mark.parametrize("variant", ["decomposed-w2", "decompose-both-factor-lycoris"])
def test_files_cross_both_ways(variant, tmp_path):
    round_trips(LoKrConfig, hf.LoKrConfig, WORDS, tmp_path, **VARIANTS[variant])


def test_layer_computes_the_kronecker_product():
    model = peftlab.get_peft_model(BUILDERS["llama"](), LoKrConfig(r=1, alpha=3, init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj  # 32 -> 16: out 16 = 4 x 4, in 32 = 4 x 8
    assert isinstance(layer, LoKrLayer)
    f = {k: t.detach() for k, t in layer.adapter_tensors("default").items()}
    assert sorted(f) == ["lokr_w1", "lokr_w2_a", "lokr_w2_b"] and f["lokr_w1"].shape == (4, 4)
    w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]  # (4, 8)
    delta = torch.zeros(16, 32)
    for i in range(4):  # the Kronecker product written out: block (i, k) is W1[i, k] W2
        for k in range(4):
            delta[4 * i: 4 * i + 4, 8 * k: 8 * k + 8] = 3 * f["lokr_w1"][i, k] * w2
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + delta).T, rtol=1e-5, atol=1e-5)


def test_merge_equals_unmerged_also_on_gpt2_conv1d():
    merge_matches(peftlab.get_peft_model(BUILDERS["llama"](), LoKrConfig(r=2, init_weights=False)))
    gpt2 = peftlab.get_peft_model(BUILDERS["gpt2"](), LoKrConfig(r=2, init_weights=False, task_type="CAUSAL_LM"))
    layer = gpt2.base_model.model.transformer.h[0].attn.c_attn
    assert layer.delta_weight("default").shape == layer.base_layer.weight.shape == (32, 96)
    merge_matches(gpt2, "gpt2")


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_rescales_only_when_asked(scale):
    model = peftlab.get_peft_model(BUILDERS["llama"](), LoKrConfig(r=2, init_weights=False, rank_dropout=0.5,
                                                                   rank_dropout_scale=scale))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    exact = layer.update("default", training=False)
    torch.manual_seed(0)
    dropped = layer.update("default", training=True)
    rows = dropped.abs().sum(1) != 0
    assert 0 < rows.sum() < 32
    factor = 32 / rows.sum() if scale else 1.0
    torch.testing.assert_close(dropped[rows], exact[rows] * factor, rtol=1e-5, atol=1e-6)


def test_trains_adapter_only():
    trains(peftlab.get_peft_model(BUILDERS["llama"](), LoKrConfig(r=4, task_type="CAUSAL_LM")))


def test_bad_config_says_what_to_do():
    with pytest.raises(ConfigError, match="init_weights"):
        LoKrConfig(init_weights="gaussian")
    with pytest.raises(ConfigError, match="decompose_factor"):
        LoKrConfig(decompose_factor=2.5)

