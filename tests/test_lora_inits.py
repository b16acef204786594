"""LoRA's PiSSA and OLoRA initialisations (rows of peftlab/methods/lora/init.py's INITIALIZERS) against HF PEFT's
`pissa_init` / `olora_init` (the reference, used only here) and against their defining equations.

Invariants checked:
- the same A, B and residual base weight as PEFT on the same weights ("pissa", "pissa_niter_K" under the same seed,
  "olora"), on nn.Linear and (PiSSA) GPT-2's Conv1D;
- the model's output is unchanged at init (W_res + s B A = W up to rounding) while the base weights did change;
- PiSSA: s B A is W's top-r part (U_r S_r V_r^T) whatever the scaling; OLoRA: B has orthonormal columns, A is upper
  triangular, s B A + W_res = W;
- saving and loading re-creates the residual from the original base (as PEFT does), in both directions;
- clear errors for targets that cannot be decomposed and for config values that name no initialiser.
"""

from __future__ import annotations

import dataclasses

import peft as hf
import pytest
import torch
from peft.utils import get_peft_model_state_dict

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.core.config import ConfigError
from peftlab.core.model import read_config

from .conftest import model_inputs, output_of, tiny_gpt2, tiny_llama
from .peft_parity import TIGHT  # PEFT's fp32 ops in the same order: equal up to matmul summation order

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


# PEFT warns about Conv1D fan_in_fan_out
pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


def pair(kind: str, seed: int = 0, **cfg):
    """(peftlab model, PEFT model), each made right after torch.manual_seed(seed) from the same base weights, so
    that randomised inits draw the same numbers in the same order."""
    torch.manual_seed(seed)
    ours = get_peft_model(BUILD[kind](), LoraConfig(**cfg))
    torch.manual_seed(seed)
    theirs = hf.get_peft_model(BUILD[kind](), hf.LoraConfig(**cfg))
    return ours, theirs


def assert_same_adapter_and_base(ours, theirs, tol=TIGHT):
    state = get_peft_model_state_dict(theirs)
    mine = ours.adapter_tensors("default")
    assert mine.keys() == state.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], state[key], **tol, msg=key)
    base_ours = {n: p for n, p in ours.named_parameters() if "lora_" not in n}
    base_theirs = {n: p for n, p in theirs.named_parameters() if "lora_" not in n}
    assert base_ours.keys() == base_theirs.keys()
    for n in base_ours:  # the residual W - s B A where targeted, the untouched weights elsewhere
        torch.testing.assert_close(base_ours[n], base_theirs[n], **tol, msg=n)


CASES = {
    "pissa-llama": ("llama", dict(r=4, lora_alpha=8, init_lora_weights="pissa")),
    "pissa-llama-rslora-all-linear": ("llama", dict(r=2, lora_alpha=3, use_rslora=True, target_modules="all-linear",
                                                    init_lora_weights="pissa")),
    "pissa-gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=2, init_lora_weights="pissa")),
    "pissa_niter-llama": ("llama", dict(r=4, lora_alpha=8, init_lora_weights="pissa_niter_3")),
    "pissa_niter-gpt2-conv1d": ("gpt2", dict(r=3, lora_alpha=3, init_lora_weights="pissa_niter_2")),
    "olora-llama": ("llama", dict(r=4, lora_alpha=8, init_lora_weights="olora")),
    "olora-llama-rank-pattern": ("llama", dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                               rank_pattern={"down_proj": 2}, init_lora_weights="olora")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_a_b_and_residual_base_as_peft(case):
    kind, cfg = CASES[case]
    ours, theirs = pair(kind, **cfg)
    assert_same_adapter_and_base(ours, theirs)
    x = model_inputs(kind)
    torch.testing.assert_close(output_of(ours, x), output_of(theirs, x), **TIGHT)


@pytest.mark.parametrize("case", sorted(CASES) + ["olora-gpt2-conv1d"])
def test_identity_at_init_while_the_base_changed(case):
    kind, cfg = CASES.get(case, ("gpt2", dict(r=4, lora_alpha=8, init_lora_weights="olora")))
    reference = BUILD[kind]()
    model = get_peft_model(BUILD[kind](), LoraConfig(**cfg))
    x = model_inputs(kind)
    # W_res + s B A = W up to one rounding per weight; the logits pass through a few layers of that.
    torch.testing.assert_close(output_of(model, x), output_of(reference, x), rtol=1e-4, atol=1e-4)
    for path, layer in model.adapter_layers():
        W0 = reference.get_submodule(path).weight
        assert not torch.allclose(layer.base_layer.weight, W0), f"{path}: the base weight should be the residual"
        torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight("default"), W0, rtol=1e-5,
                                   atol=1e-5, msg=path)
    with model.disable_adapter():  # what PEFT does too: the bare model is now the residual model
        assert not torch.allclose(output_of(model, x), output_of(reference, x), atol=1e-3)


def test_pissa_update_is_the_principal_part_whatever_the_scaling():
    """s B A = U_r S_r V_r^T with A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s): s is divided out of the factors."""
    reference = tiny_llama()
    model = get_peft_model(tiny_llama(), LoraConfig(r=3, lora_alpha=12, init_lora_weights="pissa"))  # s = 4
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    W = reference.model.layers[0].self_attn.q_proj.weight
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(layer.delta_weight("default"), (U[:, :3] * S[:3]) @ Vh[:3], rtol=1e-5, atol=1e-5)
    A, B = layer.lora_pair("default")
    torch.testing.assert_close(A.norm(dim=1), (S[:3] / 4).sqrt(), rtol=1e-5, atol=1e-6)  # rows: sqrt(S/s) * unit
    torch.testing.assert_close(B.norm(dim=0), (S[:3] / 4).sqrt(), rtol=1e-5, atol=1e-6)
    # The residual holds the remaining singular values.
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight)[: S.shape[0] - 3], S[3:], rtol=1e-4,
                               atol=1e-5)


def test_olora_factors_are_q_and_r():
    reference = tiny_llama()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights="olora"))
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    A, B = layer.lora_pair("default")  # (4, 32), (16, 4)
    torch.testing.assert_close(B.T @ B, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal columns
    assert torch.equal(A.tril(-1), torch.zeros_like(A))  # upper triangular
    W = reference.model.layers[1].self_attn.v_proj.weight
    torch.testing.assert_close(layer.base_layer.weight, W - 2.0 * B @ A, **TIGHT)


def test_olora_on_conv1d_decomposes_the_out_in_matrix():
    """GPT-2's Conv1D stores W (in, out); the QR is of the (out, in) matrix, so A is (r, in) and B (out, r). (PEFT
    decomposes the stored (in, out) weight and ends with shapes a forward pass rejects.)"""
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, lora_alpha=6, init_lora_weights="olora"))  # s = 3
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    A, B = layer.lora_pair("default")
    assert A.shape == (2, 32) and B.shape == (96, 2)
    torch.testing.assert_close(B.T @ B, torch.eye(2), rtol=0, atol=1e-5)
    W = tiny_gpt2().transformer.h[0].attn.c_attn.weight  # (32, 96)
    torch.testing.assert_close(layer.base_layer.weight, W - 3.0 * (B @ A).T, **TIGHT)


def test_pissa_niter_is_seeded_by_torch_global_generator():
    cfg = dict(r=2, init_lora_weights="pissa_niter_1")
    torch.manual_seed(5)
    a = get_peft_model(tiny_llama(), LoraConfig(**cfg)).adapter_tensors("default")
    torch.manual_seed(5)
    b = get_peft_model(tiny_llama(), LoraConfig(**cfg)).adapter_tensors("default")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- files ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_adapter_reloads_on_the_original_base_both_ways(init, tmp_path):
    """The file holds A and B only; loading re-runs the (deterministic) init on the original base, which rebuilds
    the same residual, then loads the trained A and B: same logits, in peftlab and in PEFT."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, init_lora_weights=init))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "training"
        for t in model.adapter_tensors("default").values():
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
    x = model_inputs("llama")
    expected = output_of(model, x)
    model.save_pretrained(tmp_path / "ours")
    torch.testing.assert_close(output_of(PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours"), x), expected,
                               **TIGHT)
    torch.testing.assert_close(output_of(hf.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours"), x),
                               expected, **TIGHT)

    theirs = hf.get_peft_model(tiny_llama(), hf.LoraConfig(r=2, lora_alpha=4, init_lora_weights=init))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    expected = output_of(theirs, x)
    theirs.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(output_of(PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft"), x), expected,
                               **TIGHT)


def test_randomised_pissa_reloads_onto_its_saved_residual_base(tmp_path):
    """pissa_niter_K's residual depends on the random state, so the documented way back is the residual base itself,
    with the init switched off when loading (else the residual would be decomposed again)."""
    torch.manual_seed(3)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, init_lora_weights="pissa_niter_1"))
    with torch.no_grad():
        for t in model.adapter_tensors("default").values():
            t.mul_(1.1)
    x = model_inputs("llama")
    expected = output_of(model, x)
    model.save_pretrained(tmp_path)
    residual = model.unload()
    config = dataclasses.replace(read_config(str(tmp_path)), init_lora_weights=True)
    loaded = PeftModel.from_pretrained(residual, tmp_path, config=config)
    torch.testing.assert_close(output_of(loaded, x), expected, rtol=0, atol=0)


# ---- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_embedding_target_is_refused(init):
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' decomposes a Linear-like weight, but this "
                                         r"target is a Embedding.*Leave it out of target_modules"):
        get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=init))


def test_rank_above_the_weight_rank_is_refused():
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' takes r=20 directions from a \(16, 32\) weight, "
                                         r"which has at most 16\. Lower r"):
        get_peft_model(tiny_llama(), LoraConfig(r=20, target_modules=["v_proj"], init_lora_weights="pissa"))


@pytest.mark.parametrize("value", ["pissa_niter", "pissa_niter_", "pisa", "olora_3"])
def test_unknown_init_names_the_choices(value):
    with pytest.raises(ConfigError, match=rf"LoraConfig\.init_lora_weights='{value}' is not valid; use one of: "
                                          r"True, False, .*'pissa', 'pissa_niter_<number>', 'olora'"):
        LoraConfig(init_lora_weights=value)


@pytest.mark.parametrize("value", ["pissa", "pissa_niter_4", "olora", "gaussian", True, False])
def test_known_init_values_are_accepted(value):
    assert LoraConfig(init_lora_weights=value).init_lora_weights == value
