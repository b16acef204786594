"""(IA)³ against HF PEFT (`import peft`, the reference) and against its formula, on tiny models.

Invariants checked:
- the default target/feedforward tables are PEFT's, row for row;
- with the same (random, non-unit) vectors both libraries compute the same logits on llama, gpt2 (Conv1D), bert (with
  a classification head) and t5, including PEFT's plain-suffix feedforward rule;
- files cross both ways with the same logits; tensor keys and shapes equal PEFT's (`...<path>.ia3_l`, (out, 1) or
  (1, in)); PEFT reads our adapter_config.json with the same values and its key set is PEFT's;
- each layer computes l ⊙ (W x + b) (attention side) or W (l ⊙ x) + b (feedforward), several adapters multiply;
- it trains: loss falls, only the vectors move;
- merging equals the unmerged forward and PEFT's merged weights; unmerge restores the base, and refuses zero scales;
- bad configs fail with a clear message (non-linear target, feedforward_modules not a subset of target_modules, ...).
"""

from __future__ import annotations

import peft as hf
import pytest
import torch
from peft.utils import constants as hf_constants
from torch import nn

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.model import read_config
from peftlab.methods.ia3 import IA3_FEEDFORWARD, IA3_TARGETS, IA3Config, IA3Linear

from .conftest import BUILDERS, model_inputs, output_of
from .peft_parity import PEFT_STAMPS, TASK, TIGHT, assert_files_cross_both_ways, config_keys, file_shapes



# PEFT warns about Conv1D's fan_in_fan_out and that IA3 unmerging is inexact; both expected here.
pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


def base(kind):
    """A tiny model whose biases are random: transformers initialises them to 0, which would hide whether merging
    scales the bias of an output-scaled layer (gpt2's c_attn, bert's key/value)."""
    model = BUILDERS[kind]()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def ours(kind="llama", **cfg):
    cfg.setdefault("task_type", TASK[kind])
    return peftlab.get_peft_model(base(kind), IA3Config(**cfg))


def theirs(kind="llama", **cfg):
    cfg.setdefault("task_type", TASK[kind])
    return hf.get_peft_model(base(kind), hf.IA3Config(**cfg))


def randomise(model, seed=0):
    """Give every trainable tensor (the vectors, and a task head's copy) random values, in parameter-name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


def layer(model, path):
    return model.base_model.model.get_submodule(path)


# ---- defaults ----------------------------------------------------------------------------------------------


def test_default_tables_equal_peft():
    peft_targets = hf_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    peft_ff = hf_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    assert {k: sorted(v) for k, v in IA3_TARGETS.items()} == {k: sorted(v) for k, v in peft_targets.items()}
    assert {k: sorted(v) for k, v in IA3_FEEDFORWARD.items()} == {k: sorted(v) for k, v in peft_ff.items()}
    for model_type, ff in IA3_FEEDFORWARD.items():  # each default is a valid config (PEFT's subset rule)
        assert set(ff) <= set(IA3_TARGETS[model_type]), model_type


def test_config_defaults_equal_peft():
    mine, peft_cfg = IA3Config(), hf.IA3Config()
    for key in ("target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save",
                "init_ia3_weights"):
        assert getattr(mine, key) == getattr(peft_cfg, key), key
    assert IA3Config.peft_type == "IA3"


@pytest.mark.parametrize("kind,targets,feedforward", [
    ("llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    ("gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    ("bert", ["key", "value", "output.dense"], ["output.dense"]),  # attention.output.dense too: suffix rule
    ("t5", ["k", "v", "wo"], ["wo"]),
])
def test_default_targets_and_sides_equal_peft(kind, targets, feedforward):
    mine, peft_model = ours(kind), theirs(kind)
    cfg = mine.peft_config["default"]
    assert set(cfg.target_modules) == set(targets) and cfg.feedforward_modules == feedforward
    shapes = {n: tuple(p.shape) for n, p in mine.named_parameters() if "ia3_l" in n}
    assert shapes == {n: tuple(p.shape) for n, p in peft_model.named_parameters() if "ia3_l" in n}
    assert shapes  # and (1, in) exactly on the feedforward layers
    for path, module in mine.base_model.model.named_modules():
        if isinstance(module, IA3Linear):
            assert module.feedforward["default"] == any(path.endswith(f) for f in feedforward)
            assert module.ia3_l["default"].shape == ((1, module.in_features) if module.feedforward["default"]
                                                     else (module.out_features, 1))


def test_identity_at_init_and_half_precision_base_keeps_fp32_vectors():
    x = model_inputs("llama")
    torch.testing.assert_close(output_of(ours(), x), output_of(base("llama"), x), rtol=0, atol=0)
    model = peftlab.get_peft_model(base("llama").to(torch.bfloat16), IA3Config())
    vectors = [p for n, p in model.named_parameters() if "ia3_l" in n]
    assert vectors and all(v.dtype == torch.float32 and torch.all(v == 1) for v in vectors)
    assert output_of(model, x).dtype == torch.bfloat16


# ---- same logits and files as PEFT --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_same_logits_as_peft_for_the_same_vectors(kind):
    a, b = ours(kind), theirs(kind)
    randomise(a)
    randomise(b)
    assert sorted(n for n, p in a.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in b.named_parameters() if p.requires_grad)
    vectors = [p for n, p in a.named_parameters() if "ia3_l" in n]
    assert all(not torch.allclose(v, torch.ones_like(v)) for v in vectors)
    x = model_inputs(kind)
    assert not torch.allclose(output_of(a, x), output_of(base(kind), x), atol=1e-3)
    torch.testing.assert_close(output_of(a, x), output_of(b, x), **TIGHT)


def test_plain_suffix_feedforward_rule_matches_peft():
    # PEFT's feedforward test is name.endswith(entry), with no "." boundary: "o" also makes DenseReluDense.wo
    # feedforward. Keeping the rule keeps files meaning the same modules in both libraries.
    cfg = dict(target_modules=["o", "wo"], feedforward_modules=["o"])
    a, b = ours("t5", **cfg), theirs("t5", **cfg)
    assert layer(a, "encoder.block.0.layer.1.DenseReluDense.wo").feedforward["default"]
    assert layer(a, "encoder.block.0.layer.0.SelfAttention.o").feedforward["default"]
    randomise(a)
    randomise(b)
    x = model_inputs("t5")
    torch.testing.assert_close(output_of(a, x), output_of(b, x), **TIGHT)


VARIANTS = {
    "llama": ("llama", {}),
    "llama-explicit": ("llama", dict(target_modules=["q_proj", "up_proj", "down_proj"],
                                     feedforward_modules=["up_proj", "down_proj"])),
    "llama-all-linear": ("llama", dict(target_modules="all-linear")),
    "llama-regex": ("llama", dict(target_modules=r".*\.layers\.1\.(self_attn\.v_proj|mlp\.down_proj)",
                                  feedforward_modules=r".*\.mlp\.down_proj")),
    "gpt2": ("gpt2", {}),
    "bert": ("bert", {}),
    "t5": ("t5", {}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_files_cross_both_ways_with_the_same_logits(variant, tmp_path):
    kind, cfg = VARIANTS[variant]
    x = model_inputs(kind)
    base_out = output_of(base(kind), x)

    mine = ours(kind, **cfg)
    randomise(mine)
    assert not torch.allclose(output_of(mine, x), base_out, atol=1e-3)
    # both ways with the same logits, same tensor names and shapes (on bases with random biases, see `base`)
    assert_files_cross_both_ways(mine, lambda: base(kind), x, tmp_path)
    assert any(k.endswith(".ia3_l") and k.startswith("base_model.model.") for k in file_shapes(tmp_path / "ours"))
    # The config files hold the same keys (PEFT adds only its version stamp and auto_mapping).
    assert config_keys(tmp_path / "ours") == config_keys(tmp_path / "peft") - PEFT_STAMPS


def test_our_config_is_read_by_peft_with_the_same_values(tmp_path):
    cfg = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
               init_ia3_weights=False, modules_to_save=["lm_head"], exclude_modules=["model.layers.0.self_attn.k_proj"])
    ours("llama", **cfg).save_pretrained(tmp_path)
    read = hf.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(read, hf.IA3Config) and read.peft_type == hf.PeftType.IA3
    for key, value in cfg.items():
        got = getattr(read, key)
        assert (set(got) if isinstance(got, set) else got) == (set(value) if key.endswith("_modules") and
                                                               key != "modules_to_save" else value), key
    assert isinstance(read_config(str(tmp_path)), IA3Config)


def test_default_feedforward_keeps_only_entries_in_an_explicit_target_list(tmp_path):
    # PEFT would write feedforward_modules=["down_proj"] beside target_modules=["k_proj", "v_proj"] and then refuse
    # its own file (not a subset); down_proj is not targeted, so [] means the same and stays readable.
    model = ours("llama", target_modules=["k_proj", "v_proj"])
    assert model.peft_config["default"].feedforward_modules == []
    randomise(model)
    model.save_pretrained(tmp_path)
    loaded = hf.PeftModel.from_pretrained(base("llama"), tmp_path)
    x = model_inputs("llama")
    torch.testing.assert_close(output_of(loaded, x), output_of(model, x), **TIGHT)


def test_all_linear_records_feedforward_as_the_equivalent_regex():
    model = ours("llama", target_modules="all-linear")
    cfg = model.peft_config["default"]
    assert cfg.feedforward_modules == r".*(?:down_proj)"
    assert len(cfg.target_modules) == 14  # 7 projections x 2 layers, full names (the head stays out)
    sides = {p: m.feedforward["default"] for p, m in model.base_model.model.named_modules() if isinstance(m, IA3Linear)}
    assert {p for p, ff in sides.items() if ff} == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


# ---- the formula ------------------------------------------------------------------------------------------


def test_llama_layers_compute_the_ia3_formula():
    model = ours("llama")
    randomise(model)
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(2))
    k = layer(model, "model.layers.1.self_attn.k_proj")
    l_k = k.ia3_l["default"]  # (16, 1): one scale per output feature
    torch.testing.assert_close(k(x), (x @ k.base_layer.weight.T) * l_k.flatten(), rtol=1e-6, atol=1e-6)
    down = layer(model, "model.layers.1.mlp.down_proj")
    h = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(3))
    l_d = down.ia3_l["default"]  # (1, 64): one scale per input feature
    torch.testing.assert_close(down(h), (h * l_d.flatten()) @ down.base_layer.weight.T, rtol=1e-6, atol=1e-6)


def test_gpt2_conv1d_layers_compute_the_ia3_formula_with_bias():
    model = ours("gpt2")
    randomise(model)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    attn = layer(model, "transformer.h.0.attn.c_attn")  # Conv1D: y = x W + b, W (in, out) = (32, 96)
    W, b = attn.base_layer.weight, attn.base_layer.bias
    torch.testing.assert_close(attn(x), (x @ W + b) * attn.ia3_l["default"].flatten(), rtol=1e-5, atol=1e-6)
    mlp = layer(model, "transformer.h.0.mlp.c_proj")  # feedforward: scales the 128 inputs, bias untouched
    h = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(5))
    W, b = mlp.base_layer.weight, mlp.base_layer.bias
    torch.testing.assert_close(mlp(h), (h * mlp.ia3_l["default"].flatten()) @ W + b, rtol=1e-5, atol=1e-6)


def test_several_active_adapters_multiply_each_on_its_own_side():
    model = ours("llama", target_modules=["down_proj"], feedforward_modules=["down_proj"])
    model.add_adapter("out", IA3Config(target_modules=["down_proj"], feedforward_modules=[]))
    model.set_adapter(["default", "out"])
    randomise(model)
    down = layer(model, "model.layers.0.mlp.down_proj")
    l_in, l_out = down.ia3_l["default"].flatten(), down.ia3_l["out"].flatten()
    assert l_in.shape == (64,) and l_out.shape == (32,)
    h = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(6))
    expected = ((h * l_in) @ down.base_layer.weight.T) * l_out
    torch.testing.assert_close(down(h), expected, rtol=1e-5, atol=1e-6)


# ---- training ----------------------------------------------------------------------------------------------


def test_trains_vectors_move_base_stays():
    model = ours("llama")
    model.train()
    x = model_inputs("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "ia3_l" not in n}
    vectors = {n: p.detach().clone() for n, p in model.named_parameters() if "ia3_l" in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(vectors)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(25):
        loss = model(**x, labels=x["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], v) for n, v in vectors.items()), "every vector should move"
    assert all(torch.equal(params[n], p) for n, p in base.items()), "base weights must not change"


# ---- merging -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_merge_equals_unmerged_and_peft_merged_weights(kind):
    a, b = ours(kind), theirs(kind)
    randomise(a)
    randomise(b)
    x = model_inputs(kind)
    unmerged = output_of(a, x)
    before = {n: p.detach().clone() for n, p in a.named_parameters() if "base_layer" in n}
    a.merge_adapter()
    torch.testing.assert_close(output_of(a, x), unmerged, rtol=1e-5, atol=1e-5)
    a.unmerge_adapter()  # x * l / l: exact up to one rounding per weight
    for n, p in a.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-6, msg=n)
    mine, peft_merged = a.merge_and_unload().state_dict(), b.merge_and_unload().state_dict()
    assert mine.keys() == peft_merged.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], peft_merged[k], **TIGHT, msg=k)
    torch.testing.assert_close(output_of(a.base_model.model, x), unmerged, rtol=1e-5, atol=1e-5)


def test_delta_weight_is_what_merging_adds_to_the_weight():
    model = ours("gpt2")
    randomise(model)
    for path in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"):
        lay = layer(model, path)
        before = lay.base_layer.weight.detach().clone()
        delta = lay.delta_weight("default")
        lay.merge(["default"])
        torch.testing.assert_close(lay.base_layer.weight - before, delta, rtol=1e-6, atol=1e-6)


def test_unmerge_refuses_a_zero_scale_and_changes_nothing():
    model = ours("llama")
    randomise(model)
    k = layer(model, "model.layers.0.self_attn.k_proj")
    with torch.no_grad():
        k.ia3_l["default"][3] = 0.0
    x = model_inputs("llama")
    expected = output_of(model, x)
    model.merge_adapter()
    merged_weight = k.base_layer.weight.detach().clone()
    assert torch.all(merged_weight[3] == 0)
    with pytest.raises(ValueError, match=r"1 entries of its ia3_l vector are 0.*reload the base model"):
        model.unmerge_adapter()
    assert torch.equal(k.base_layer.weight, merged_weight) and k.merged
    torch.testing.assert_close(output_of(model, x), expected, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()  # no unmerge needed: fine
    torch.testing.assert_close(output_of(plain, x), expected, rtol=1e-5, atol=1e-5)


# ---- bad configs -------------------------------------------------------------------------------------------


def test_target_that_is_not_linear_is_refused():
    with pytest.raises(ConfigError, match=r"input_layernorm.*LlamaRMSNorm.*ia3 cannot adapt.*Linear, Conv1D"):
        ours("llama", target_modules=["k_proj", "input_layernorm"], feedforward_modules=[])


def test_feedforward_not_a_subset_of_targets_is_refused_as_peft_refuses_it():
    with pytest.raises(ConfigError, match=r"feedforward_modules=\['down_proj'\] is not a subset of target_modules"):
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="subset"):
        hf.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match=r"not a subset of the default target_modules.*llama"):
        ours("llama", feedforward_modules=["up_proj"])


def test_default_feedforward_that_would_touch_a_target_outside_the_list_is_refused():
    # gpt2's default ["mlp.c_proj"] would make the targeted h.N.mlp.c_proj feedforward while only "c_proj" is listed.
    with pytest.raises(ConfigError, match=r"'mlp.c_proj' would make the targeted module 'transformer.h.0.mlp.c_proj'"):
        ours("gpt2", target_modules=["c_attn", "c_proj"])
    model = ours("gpt2", target_modules=["c_attn", "c_proj"], feedforward_modules=["c_proj"])  # explicit: fine
    assert layer(model, "transformer.h.0.attn.c_proj").feedforward["default"]


def test_unknown_model_type_asks_for_feedforward_modules():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(ConfigError, match=r"feedforward_modules is not set.*model_type=None.*\[\] for none"):
        peftlab.get_peft_model(model, IA3Config(target_modules=["0", "2"]))
    wrapped = peftlab.get_peft_model(model, IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    assert wrapped.base_model.model[2].ia3_l["default"].shape == (1, 16)


@pytest.mark.parametrize("kwargs,message", [
    (dict(layers_to_transform=[1]), "no layers_to_transform"),
    (dict(feedforward_modules=3), "feedforward_modules=3 is not valid"),
    (dict(init_ia3_weights="yes"), "init_ia3_weights='yes' is not valid"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        IA3Config(**kwargs)


def test_weight_decay_never_reaches_the_scaling_vectors():
    """The vectors are 2-D in PEFT's layout; the loop's 1-D no-decay rule alone would decay them towards 0."""
    from peftlab.train.loop import param_groups_with_decay

    model = peftlab.get_peft_model(BUILDERS["llama"](), IA3Config(task_type="CAUSAL_LM"))
    groups = param_groups_with_decay(model, lr=1e-3, weight_decay=0.1)
    vectors = {id(t) for t in model.trainable_tensors("default").values()}
    assert vectors and all(g["weight_decay"] == 0.0 for g in groups if {id(p) for p in g["params"]} & vectors)
