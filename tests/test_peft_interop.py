"""Interchange with HF PEFT (`import peft`, used here only as the reference implementation).

Invariants checked:
- an adapter saved by peftlab and loaded by PEFT (and the reverse) computes the same logits;
- the safetensors file peftlab writes has exactly PEFT's keys and shapes for the same config;
- adapter_config.json is readable by PEFT with the same values;
- in-model parameter names (state_dict) are PEFT's;
- merge_and_unload and add_weighted_adapter give PEFT's results on identical adapter weights.

Every model is a tiny one built from a config (tests/conftest.py); nothing is downloaded.
"""

from __future__ import annotations

import json

import peft as hf
import pytest
import torch
from torch import nn

import peftlab
from .peft_parity import TASK, TIGHT, WEIGHTS, build, file_shapes, forward


# PEFT warns about Conv1D fan_in_fan_out and saved embeddings; those are expected here.
pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


def ours_model(kind: str, **cfg) -> peftlab.PeftModel:
    cfg.setdefault("init_lora_weights", False)
    if kind in TASK:
        cfg.setdefault("task_type", TASK[kind])
    return peftlab.get_peft_model(build(kind), peftlab.LoraConfig(**cfg))


def peft_model(kind: str, **cfg):
    cfg.setdefault("init_lora_weights", False)
    if kind in TASK:
        cfg.setdefault("task_type", TASK[kind])
    return hf.get_peft_model(build(kind), hf.LoraConfig(**cfg))


def perturb_saved_copies(model: nn.Module, seed: int = 5) -> None:
    """Make every modules_to_save copy differ from the original, so a lost copy shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


# ---- logits round trip, both ways ----------------------------------------------------------------------
# The plain round trip on every architecture (peftlab save -> PEFT load and PEFT save -> peftlab load, same logits,
# same file keys; bert's classifier copy, GPT-2's fan_in_fan_out Conv1D) is the conformance suite's, on LoRA's examples
# (peftlab/methods/lora/examples.py, tests/test_conformance.py::test_hf_peft_round_trip). Here: the config variants.

# Config variants: (model kind, LoraConfig kwargs). Used for file keys and for logits in both directions.
VARIANTS = {
    "gpt2-bias-none": ("gpt2", dict(bias="none")),
    "gpt2-bias-all": ("gpt2", dict(bias="all")),
    "gpt2-bias-lora_only": ("gpt2", dict(bias="lora_only")),
    "bert-bias-all-with-head": ("bert", dict(bias="all")),
    "bert-bias-lora_only-with-head": ("bert", dict(bias="lora_only")),
    "llama-modules_to_save": ("llama", dict(modules_to_save=["lm_head"])),
    "t5-modules_to_save-bias-all": ("t5", dict(modules_to_save=["lm_head"], bias="all")),
    "llama-rank-alpha-pattern": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                               rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 2},
                                               alpha_pattern={"down_proj": 32})),
    "llama-rslora": ("llama", dict(r=4, lora_alpha=16, use_rslora=True)),
    "llama-embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "conv2d": ("conv", dict(target_modules=["conv"], modules_to_save=["head"])),
    "llama-all-linear": ("llama", dict(target_modules="all-linear")),
    "bert-all-linear-with-head": ("bert", dict(target_modules="all-linear")),
    "t5-layers_to_transform": ("t5", dict(target_modules=["q", "v", "wo"], layers_to_transform=[1],
                                          layers_pattern="block")),
    "llama-regex": ("llama", dict(target_modules=r".*\.1\.(self_attn\.(k|v)_proj|mlp\.up_proj)")),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_file_keys_and_shapes_equal_peft(variant, tmp_path):
    """For the same config, adapter_model.safetensors holds exactly PEFT's tensor names with PEFT's shapes."""
    kind, cfg = VARIANTS[variant]
    ours_model(kind, **cfg).save_pretrained(tmp_path / "ours")
    peft_model(kind, **cfg).save_pretrained(tmp_path / "peft")
    ours, theirs = file_shapes(tmp_path / "ours"), file_shapes(tmp_path / "peft")
    assert sorted(set(ours) - set(theirs)) == [], "keys peftlab writes that PEFT does not"
    assert sorted(set(theirs) - set(ours)) == [], "keys PEFT writes that peftlab does not"
    assert ours == theirs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_round_trip_both_ways(variant, tmp_path):
    """rank/alpha patterns, rsLoRA, biases, embedding and conv targets: the same logits after crossing over in
    either direction (scaling and bias handling agree, not only the key names)."""
    kind, cfg = VARIANTS[variant]
    base_out = forward(build(kind), kind)

    ours = ours_model(kind, **cfg)
    perturb_saved_copies(ours)
    with torch.no_grad():  # make trained biases differ from the base, so saving/loading them matters
        for name, p in ours.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(0.1)
    expected = forward(ours, kind)
    assert not torch.allclose(expected, base_out, atol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    torch.testing.assert_close(forward(hf.PeftModel.from_pretrained(build(kind), tmp_path / "ours"), kind),
                               expected, **TIGHT)

    theirs = peft_model(kind, **cfg)
    perturb_saved_copies(theirs)
    expected = forward(theirs, kind)
    assert not torch.allclose(expected, base_out, atol=1e-4)
    theirs.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(forward(peftlab.PeftModel.from_pretrained(build(kind), tmp_path / "peft"), kind),
                               expected, **TIGHT)


# ---- several adapters -----------------------------------------------------------------------------------


def test_two_adapters_saved_by_peftlab_load_in_peft_per_adapter(tmp_path):
    """"default" in the folder, "other" in other/: PEFT loads both (load_adapter with subfolder) and each adapter
    gives the same logits as in peftlab."""
    ours = ours_model("llama", r=4)
    ours.add_adapter("other", peftlab.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "o_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    expected = {}
    for name in ("default", "other"):
        ours.set_adapter(name)
        expected[name] = forward(ours, "llama")
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-4)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "other" / WEIGHTS).is_file() and (tmp_path / "other" / "adapter_config.json").is_file()

    theirs = hf.PeftModel.from_pretrained(build("llama"), tmp_path)
    theirs.load_adapter(tmp_path, adapter_name="other", subfolder="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        torch.testing.assert_close(forward(theirs, "llama"), expected[name], **TIGHT)


def test_two_adapters_saved_by_peft_load_in_peftlab_per_adapter(tmp_path):
    """The reverse: PEFT writes default + other/, peftlab loads both and matches PEFT per adapter."""
    theirs = peft_model("gpt2", r=4)
    theirs.add_adapter("other", hf.LoraConfig(r=2, lora_alpha=5, target_modules=["c_fc"], init_lora_weights=False,
                                              task_type="CAUSAL_LM"))
    expected = {}
    for name in ("default", "other"):
        theirs.set_adapter(name)
        expected[name] = forward(theirs, "gpt2")
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-4)
    theirs.save_pretrained(tmp_path)

    ours = peftlab.PeftModel.from_pretrained(build("gpt2"), tmp_path)
    ours.load_adapter(tmp_path, adapter_name="other", subfolder="other")
    for name in ("default", "other"):
        ours.set_adapter(name)
        torch.testing.assert_close(forward(ours, "gpt2"), expected[name], **TIGHT)


# ---- config file and in-model names ---------------------------------------------------------------------


def test_our_adapter_config_is_read_by_peft_with_same_values(tmp_path):
    """peft.PeftConfig.from_pretrained reads our adapter_config.json (no unknown-key error) and sees the same
    r, alpha, targets, patterns, bias, rsLoRA, modules_to_save and task type."""
    cfg = dict(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 3},
               alpha_pattern={"v_proj": 7}, bias="lora_only", use_rslora=True, modules_to_save=["lm_head"])
    ours_model("llama", **cfg).save_pretrained(tmp_path)
    read = hf.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(read, hf.LoraConfig)
    assert read.peft_type == hf.PeftType.LORA and read.task_type == "CAUSAL_LM"
    assert (read.r, read.lora_alpha) == (6, 12)
    assert set(read.target_modules) == {"q_proj", "v_proj"}
    assert read.rank_pattern == {"q_proj": 3} and read.alpha_pattern == {"v_proj": 7}
    assert (read.bias, read.use_rslora, read.init_lora_weights) == ("lora_only", True, False)
    assert list(read.modules_to_save) == ["lm_head"]
    # Our file uses only keys that PEFT's LoraConfig has, so nothing of ours is dropped silently on PEFT's side.
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) <= set(hf.LoraConfig().to_dict())


SHARED_CONFIG_KEYS = ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias",
                      "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform",
                      "layers_pattern", "exclude_modules", "inference_mode"]


def test_adapter_config_values_equal_peft_for_default_targets(arch, tmp_path):
    """With target_modules left to the architecture default, our adapter_config.json records the resolved
    targets (as PEFT does; vLLM reads them) and every shared key holds PEFT's value (GPT-2: fan_in_fan_out=true,
    the layout of its Conv1D weights)."""
    ours_model(arch).save_pretrained(tmp_path / "ours")
    peft_model(arch).save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert ours["target_modules"] is not None
    assert set(ours["target_modules"]) == set(theirs["target_modules"])
    assert {k: ours[k] for k in SHARED_CONFIG_KEYS} == {k: theirs[k] for k in SHARED_CONFIG_KEYS}
    # PEFT lists every head name of the task ("classifier", "score"); we list the one the model has.
    assert set(ours["modules_to_save"] or []) == set(theirs["modules_to_save"] or []) & {"classifier"}


def test_all_linear_with_layers_to_transform_is_readable_by_peft(tmp_path):
    """PEFT refuses target_modules="all-linear" beside layers_to_transform, and never writes "all-linear" to a
    file: it records the layers it resolved. We record the resolved module names too, so PEFT loads our file and
    adapts exactly the same layers (same logits)."""
    ours = ours_model("llama", target_modules="all-linear", layers_to_transform=[1])
    expected = forward(ours, "llama")
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(written["target_modules"], list) and len(written["target_modules"]) == 7
    assert all(".layers.1." in name for name in written["target_modules"])
    theirs = hf.PeftModel.from_pretrained(build("llama"), tmp_path)
    torch.testing.assert_close(forward(theirs, "llama"), expected, **TIGHT)


def test_state_dict_names_equal_peft_in_model_names(arch):
    """model.state_dict() keys (adapter tensors, base_layer, modules_to_save copies) are PEFT's exactly,
    e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight."""
    ours = set(ours_model(arch).state_dict())
    theirs = set(peft_model(arch).state_dict())
    assert sorted(ours - theirs) == [] and sorted(theirs - ours) == []
    assert any(".lora_A.default.weight" in k for k in ours)
    if arch == "llama":
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in ours


# ---- merging and combining ------------------------------------------------------------------------------

MERGE_CASES = {
    "llama": ("llama", {}),
    "gpt2-fan_in_fan_out": ("gpt2", {}),
    "bert-with-head": ("bert", {}),
    "t5": ("t5", {}),
    "llama-embedding-rslora": ("llama", dict(target_modules=["embed_tokens", "q_proj"], use_rslora=True)),
    "conv2d": ("conv", dict(target_modules=["conv"])),
}


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_and_unload_gives_peft_merged_weights(case, tmp_path):
    """Identical adapter weights (ours saved, loaded into PEFT): both merge_and_unload() return base models
    with the same parameter names and the same merged weights."""
    kind, cfg = MERGE_CASES[case]
    ours = ours_model(kind, **cfg)
    perturb_saved_copies(ours)
    ours.save_pretrained(tmp_path)
    theirs = hf.PeftModel.from_pretrained(build(kind), tmp_path)

    merged_ours = ours.merge_and_unload().state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert sorted(merged_ours) == sorted(merged_theirs)
    plain = build(kind).state_dict()
    changed = [k for k in plain if not torch.equal(plain[k], merged_ours[k])]
    assert changed, "merging should change some base weights"
    for key in merged_theirs:
        torch.testing.assert_close(merged_ours[key], merged_theirs[key], **TIGHT, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd"])
def test_add_weighted_adapter_matches_peft(kind, combination_type, tmp_path):
    """The same two input adapters in both libraries; add_weighted_adapter with the same options gives the same
    logits once the new adapter is set active. Different alphas make the per-adapter scalings differ, and a
    negative weight checks the sign handling."""
    r_b = 4 if combination_type == "linear" else 2  # linear needs equal ranks
    ours = ours_model(kind, r=4, lora_alpha=8)
    ours.add_adapter("b", peftlab.LoraConfig(r=r_b, lora_alpha=3, init_lora_weights=False, task_type=TASK[kind]))
    ours.save_pretrained(tmp_path)
    theirs = hf.PeftModel.from_pretrained(build(kind), tmp_path)
    theirs.load_adapter(tmp_path / "b", adapter_name="b")

    options = dict(combination_type=combination_type)
    if combination_type == "svd":
        options.update(svd_rank=3, svd_full_matrices=False)
    ours.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", **options)
    theirs.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", **options)
    ours.set_adapter("mix")
    theirs.set_adapter("mix")

    got, want = forward(ours, kind), forward(theirs, kind)
    assert not torch.allclose(want, forward(build(kind), kind), atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
