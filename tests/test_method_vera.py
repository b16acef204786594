"""VeRA against HF PEFT (`import peft`, the reference) on tiny models.

Invariants checked:
- the same projection_prng_key gives PEFT's shared A and B bit for bit (sized to the largest adapted layer,
  Kaiming-uniform drawn A then B from one CPU generator); another key gives others;
- with the same vectors d, b both libraries compute the same logits (llama, whose q_proj and v_proj differ in
  out size so v_proj uses a slice of B; gpt2's Conv1D);
- files cross both ways with the same logits, with save_projection True (A, B in the file under
  base_model.vera_A / base_model.vera_B) and False (A, B regenerated from the key on load); keys and shapes
  equal PEFT's; PEFT reads our adapter_config.json with the same values;
- merge: merged == unmerged, and merge_and_unload gives PEFT's merged weights;
- A and B are held once on the wrapped model (not per layer), follow `.to()`, and go with the adapter.
"""

from __future__ import annotations

import json

import peft as hf
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.model import read_config
from peftlab.methods.vera import VeraConfig, VeraLinear

from .conftest import BUILDERS, model_inputs, output_of
from .peft_parity import TASK, TIGHT, WEIGHTS, assert_files_cross_both_ways, file_shapes



# PEFT warns about save_projection=False and Conv1D's fan_in_fan_out; both expected here.
pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


def ours(kind="llama", **cfg):
    cfg.setdefault("task_type", TASK[kind])
    return peftlab.get_peft_model(BUILDERS[kind](), VeraConfig(**cfg))


def theirs(kind="llama", **cfg):
    cfg.setdefault("task_type", TASK[kind])
    return hf.get_peft_model(BUILDERS[kind](), hf.VeraConfig(**cfg))


def randomise_vectors(model, seed=0):
    """Give every vera_lambda_* (and any trained bias) random values, in parameter-name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


def projections(model):
    return model.base_model.vera_A["default"], model.base_model.vera_B["default"]


# ---- shared projections ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,key", [("llama", 0), ("llama", 1234), ("gpt2", 7)])
def test_same_key_gives_peft_projections_bit_for_bit(kind, key):
    a_ours, b_ours = projections(ours(kind, r=6, projection_prng_key=key))
    a_peft, b_peft = projections(theirs(kind, r=6, projection_prng_key=key))
    assert torch.equal(a_ours, a_peft) and torch.equal(b_ours, b_peft)
    # llama q_proj is 32 -> 32, v_proj 32 -> 16 (2 kv heads x 8): A (r, 32), B (32, r); gpt2 c_attn is 32 -> 96.
    assert a_ours.shape == (6, 32) and b_ours.shape == ((32, 6) if kind == "llama" else (96, 6))


def test_another_key_gives_other_projections():
    a0, b0 = projections(ours(r=4, projection_prng_key=0))
    a1, b1 = projections(ours(r=4, projection_prng_key=1))
    assert not torch.equal(a0, a1) and not torch.equal(b0, b1)


def test_projections_are_held_once_frozen_and_follow_the_model():
    model = ours(r=4)
    sd = model.state_dict()
    assert [k for k in sd if "vera_A" in k] == ["base_model.vera_A.default"]  # PEFT's place, and only there
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vera_lambda" not in n)
    trainable, _ = model.get_nb_trainable_parameters()
    # Per layer r + out: q_proj 4 + 32, v_proj 4 + 16, two layers. PEFT counts the same.
    assert trainable == 2 * ((4 + 32) + (4 + 16)) == theirs(r=4).get_nb_trainable_parameters()[0]
    model.double()  # the layers read the moved tensors, not stale references
    assert projections(model)[0].dtype == torch.float64
    assert output_of(model, model_inputs("llama")).dtype == torch.float64


def test_identity_at_init_then_the_vectors_change_the_output():
    model, x = ours(r=4), model_inputs("llama")
    base = output_of(BUILDERS["llama"](), x)
    torch.testing.assert_close(output_of(model, x), base, rtol=0, atol=0)  # b starts at 0
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, VeraLinear)
    assert torch.all(layer.vera_lambda_d["default"] == 0.1) and torch.all(layer.vera_lambda_b["default"] == 0)
    randomise_vectors(model)
    assert not torch.allclose(output_of(model, x), base, atol=1e-4)


def test_layer_computes_the_vera_formula():
    """y = W x + b * (B[:out] (d * (A[:, :in] x))) on v_proj, which uses a slice of the shared B."""
    model = ours(r=5)
    randomise_vectors(model)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    A, B = projections(model)
    d, b = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(2))
    W = layer.base_layer.weight
    expected = x @ W.T + b * ((d * (x @ A[:, :32].T)) @ B[:16].T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


# ---- same outputs and files as PEFT ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_same_logits_as_peft_for_the_same_vectors(kind):
    a, b = ours(kind, r=8), theirs(kind, r=8)
    randomise_vectors(a)
    randomise_vectors(b)
    assert sorted(n for n, p in a.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in b.named_parameters() if p.requires_grad)
    x = model_inputs(kind)
    torch.testing.assert_close(output_of(a, x), output_of(b, x), **TIGHT)


VARIANTS = {
    "llama": ("llama", dict(r=8)),
    "llama-no-projection": ("llama", dict(r=8, save_projection=False, projection_prng_key=3)),
    "llama-all-linear-d_initial": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"],
                                                d_initial=0.5)),
    "gpt2-vera_only-bias": ("gpt2", dict(r=4, bias="vera_only")),
    "gpt2-no-projection-bias-all": ("gpt2", dict(r=4, bias="all", save_projection=False)),
    "bert-head-layers": ("bert", dict(r=4, target_modules=["query", "value"], layers_to_transform=[1])),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_files_cross_both_ways_with_the_same_logits(variant, tmp_path):
    """Both ways, same logits, same tensor names and shapes (tests/peft_parity.py); base_model.vera_A/B are in the
    file only when save_projection is set."""
    kind, cfg = VARIANTS[variant]
    x = model_inputs(kind)
    mine = ours(kind, **cfg)
    randomise_vectors(mine)
    assert not torch.allclose(output_of(mine, x), output_of(BUILDERS[kind](), x), atol=1e-4)
    assert_files_cross_both_ways(mine, BUILDERS[kind], x, tmp_path)
    assert ("base_model.vera_A" in file_shapes(tmp_path / "ours")) == cfg.get("save_projection", True)


def test_our_config_is_read_by_peft_with_the_same_values(tmp_path):
    cfg = dict(r=12, projection_prng_key=9, save_projection=False, vera_dropout=0.05, d_initial=0.3, bias="vera_only",
               target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    ours("llama", **cfg).save_pretrained(tmp_path)
    read = hf.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(read, hf.VeraConfig) and read.peft_type == hf.PeftType.VERA
    for key, value in cfg.items():
        got = getattr(read, key)
        assert (set(got) if key == "target_modules" else got) == (set(value) if key == "target_modules" else value)
    assert isinstance(read_config(str(tmp_path)), VeraConfig)


def test_defaults_equal_peft():
    mine, peft_cfg = VeraConfig(), hf.VeraConfig()
    for key in ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out", "bias",
                "init_weights", "modules_to_save", "target_modules"):
        assert getattr(mine, key) == getattr(peft_cfg, key), key
    assert VeraConfig.peft_type == "VERA"


# ---- merging -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_equals_unmerged_and_matches_peft_merge(kind, tmp_path):
    model = ours(kind, r=8)
    randomise_vectors(model)
    x = model_inputs(kind)
    unmerged = output_of(model, x)
    model.save_pretrained(tmp_path)
    peft_side = hf.PeftModel.from_pretrained(BUILDERS[kind](), tmp_path)

    model.merge_adapter()
    torch.testing.assert_close(output_of(model, x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, x), unmerged, rtol=1e-5, atol=1e-5)

    merged_ours = model.merge_and_unload().state_dict()
    merged_peft = peft_side.merge_and_unload().state_dict()
    assert sorted(merged_ours) == sorted(merged_peft)
    for key in merged_peft:
        torch.testing.assert_close(merged_ours[key], merged_peft[key], **TIGHT, msg=key)


def test_delta_weight_is_diag_b_B_diag_d_A():
    model = ours(r=3)
    randomise_vectors(model)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    A, B = projections(model)
    d, b = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
    expected = torch.diag(b) @ B[:16] @ torch.diag(d) @ A[:, :32]  # (16, 32), v_proj's weight shape
    torch.testing.assert_close(layer.delta_weight("default"), expected, rtol=1e-5, atol=1e-6)


# ---- several adapters, deleting, errors ----------------------------------------------------------------------


def test_second_adapter_has_its_own_projections_and_deleting_drops_them():
    model = ours(r=4)
    model.add_adapter("other", VeraConfig(r=6, projection_prng_key=5, target_modules=["k_proj"]))
    A = model.base_model.vera_A
    assert A["default"].shape == (4, 32) and A["other"].shape == (6, 32)
    expected_other = projections(theirs(r=6, projection_prng_key=5, target_modules=["k_proj"]))[0]
    assert torch.equal(A["other"], expected_other)
    model.delete_adapter("other")
    assert "other" not in model.base_model.vera_A and "default" in model.base_model.vera_A
    model.delete_adapter("default")
    assert "vera_A" not in dict(model.base_model.named_children())


@pytest.mark.parametrize("kwargs,message", [
    (dict(bias="lora_only"), r"VeraConfig.bias='lora_only' is not valid; use one of: 'none', 'all', 'vera_only'"),
    (dict(r=0), r"VeraConfig.r=0 is not valid; it must be an integer >= 1"),
    (dict(vera_dropout=1.0), r"VeraConfig.vera_dropout=1.0 is not valid"),
])
def test_config_errors_name_the_field_and_the_valid_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        VeraConfig(**kwargs)


def test_file_without_projections_is_refused_when_the_config_says_they_are_saved(tmp_path):
    model = ours(r=4)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS))
    del tensors["base_model.vera_A"], tensors["base_model.vera_B"]
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / WEIGHTS))
    with pytest.raises(peftlab.AdapterFileError, match=r"not in the file: base_model.vera_A, base_model.vera_B"):
        peftlab.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_projection"] is True
