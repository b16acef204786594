"""Bad inputs raise clear errors: the right exception type, and a message that names what was seen and says
what to do. Failed operations leave the model and the files on disk as they were.

Every model is a tiny one built from a config (tests/conftest.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from peftlab import AdapterFileError, ConfigError, LoraConfig, PeftModel, get_peft_model

from .conftest import VOCAB, model_inputs, output_of, tiny_bert_cls, tiny_gpt2, tiny_llama

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def llama_of_width(hidden: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    """Another architecture with q_proj/v_proj, under model.decoder.layers instead of model.layers."""
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTForCausalLM(cfg).eval()


def saved_adapter(folder, model=None, **cfg) -> PeftModel:
    cfg.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model if model is not None else tiny_llama(), LoraConfig(**cfg))
    peft_model.save_pretrained(folder)
    return peft_model


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {k: (v.detach().clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()}


def assert_same_snapshot(before, after) -> None:
    assert sorted(after) == sorted(before), "parameter names changed"
    for k, (value, grad) in before.items():
        assert torch.equal(after[k][0], value), f"{k} changed"
        assert after[k][1] == grad, f"{k}.requires_grad changed"


def folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- target selection ---------------------------------------------------------------------------------------


def test_target_typo_names_nearest_present_module_and_an_example():
    """A target that matches nothing lists the nearest real name ("q_proj" for "q_prj") and an example."""
    with pytest.raises(ConfigError, match=r"target_modules=\['q_prj'\] matched no module of LlamaForCausalLM") as e:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_prj"]))
    message = str(e.value)
    assert re.search(r"Nearest module names present: q_proj\b", message)
    assert re.search(r"Example: target_modules=\['\w+', '\w+'\]", message)


def test_target_regex_matching_nothing_names_nearest_module():
    with pytest.raises(ConfigError, match=r"target_modules='\.\*\\\\\.v_prj' matched no module.*Nearest module names "
                                          r"present: .*v_proj"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*\.v_prj"))


def test_layers_to_transform_out_of_range_says_it_filtered_everything():
    with pytest.raises(ConfigError, match=r"layers_to_transform=\[7\].*also filter"):
        get_peft_model(tiny_llama(), LoraConfig(layers_to_transform=[7]))


class WeirdModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"model_type": "weird"})()
        self.proj_in = nn.Linear(4, 8)
        self.proj_out = nn.Linear(8, 2)

    def forward(self, x):
        return self.proj_out(self.proj_in(x))


def test_no_default_targets_for_unknown_model_type_asks_for_target_modules():
    """model_type "weird" and target_modules=None: the message names the model type, the linear layers present
    and an explicit setting to use."""
    with pytest.raises(ConfigError, match=r"target_modules is not set.*model_type='weird'.*proj_in.*proj_out.*"
                                          r"target_modules=\['proj_in', 'proj_out'\].*'all-linear'"):
        get_peft_model(WeirdModel(), LoraConfig())


def test_no_default_targets_for_plain_sequential():
    with pytest.raises(ConfigError, match=r"target_modules is not set.*model_type=None.*target_modules=\['0', '2'\]"):
        get_peft_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), LoraConfig())


@pytest.mark.parametrize("target, kind, builder", [
    ("input_layernorm", "LlamaRMSNorm", tiny_llama),
    ("LayerNorm", "LayerNorm", tiny_bert_cls),
])
def test_target_of_a_type_lora_cannot_wrap_names_type_and_fix(target, kind, builder):
    with pytest.raises(ConfigError, match=rf"target '[\w.]*{target}' is a {kind}, which lora cannot adapt \(it wraps: "
                                          rf"Linear, Conv1D, Embedding, Conv2d\).*exclude_modules="):
        get_peft_model(builder(), LoraConfig(target_modules=[target]))


def test_modules_to_save_typo_names_nearest_module():
    with pytest.raises(ConfigError, match=r"modules_to_save entry 'lm_hed' matched no module.*Nearest module names "
                                          r"present: lm_head.*modules_to_save=\['lm_head'\]"):
        get_peft_model(tiny_llama(), LoraConfig(modules_to_save=["lm_hed"]))


def test_add_adapter_failing_half_way_leaves_no_half_added_adapter():
    """Targets q_proj (wrappable, comes first) and input_layernorm (not): the error must not leave the q_proj
    layers carrying the new adapter, and the name stays free."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"input_layernorm' is a LlamaRMSNorm"):
        model.add_adapter("bad", LoraConfig(target_modules=["q_proj", "k_proj", "input_layernorm"]))
    assert_same_snapshot(before, snapshot(model))
    assert list(model.peft_config) == ["default"]
    model.add_adapter("bad", LoraConfig(target_modules=["k_proj"]))  # the name was not taken by the failure
    assert "bad" in model.peft_config


def test_failed_get_peft_model_leaves_the_base_model_unwrapped():
    base = tiny_llama()
    names = sorted(base.state_dict())
    with pytest.raises(ConfigError):
        get_peft_model(base, LoraConfig(target_modules=["q_proj", "post_attention_layernorm"]))
    assert sorted(base.state_dict()) == names


# ---- config values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), r"LoraConfig\.r=0 is not valid; it must be an integer >= 1\."),
    (dict(r=-1), r"LoraConfig\.r=-1 is not valid; it must be an integer >= 1\."),
    (dict(r=1.5), r"LoraConfig\.r=1\.5 is not valid; it must be an integer >= 1\."),
    (dict(lora_dropout=1.0), r"LoraConfig\.lora_dropout=1\.0 is not valid; it must be a number >= 0 and < 1\."),
    (dict(lora_alpha="big"), r"LoraConfig\.lora_alpha='big' is not valid; it must be a number\.$"),
    (dict(bias="some"), r"LoraConfig\.bias='some' is not valid; use one of: 'none', 'all', 'lora_only'\."),
    (dict(init_lora_weights="nonsense"),
     r"LoraConfig\.init_lora_weights='nonsense' is not valid; use one of: True, False, 'default', 'gaussian', "
     r"'random', 'pissa', 'pissa_niter_<number>', 'olora', 'loftq' \(<number>: an integer"),
    (dict(task_type="FOO"), r"task_type='FOO' is not a known task type; use one of: CAUSAL_LM, SEQ_CLS"),
    (dict(rank_pattern={"q_proj": 0}), r"LoraConfig\.rank_pattern\['q_proj'\]=0 is not valid; ranks are integers >= 1"),
    (dict(alpha_pattern={"v_proj": "x"}),
     r"LoraConfig\.alpha_pattern\['v_proj'\]='x' is not valid; it must be a number"),
    (dict(layers_pattern="layers"),
     r"layers_pattern='layers' is set but layers_to_transform is not.*Set layers_to_transform=\[0, 1, \.\.\.\] too"),
], ids=["r=0", "r=-1", "r=1.5", "dropout=1", "alpha=str", "bias", "init", "task_type", "rank_pattern-0",
        "alpha_pattern-str", "layers_pattern-alone"])
def test_bad_config_value_names_field_value_and_allowed_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("extra", [dict(layers_to_transform=[0]), dict(layers_to_transform=[0], layers_pattern="h")])
def test_regex_targets_with_layer_filter_are_refused_like_peft(extra):
    """PEFT cannot read a file with a regex target_modules beside layers_to_transform/layers_pattern; refuse it
    when the config is made, saying how to put the layers into the expression."""
    with pytest.raises(ConfigError, match=r"target_modules='\.\*q_proj' is a regular expression, which cannot be "
                                          r"combined with layers_to_transform/layers_pattern.*Put the layer indices "
                                          r"into the expression"):
        LoraConfig(target_modules=".*q_proj", **extra)
    LoraConfig(target_modules=["q_proj"], **extra)  # a list may be filtered by layer
    LoraConfig(target_modules="all-linear", **extra)  # resolved to a list of names when the adapter is added


def test_config_errors_are_value_errors():
    """Callers catching ValueError (as for PEFT's config errors) still catch ours."""
    with pytest.raises(ValueError):
        LoraConfig(r=0)


# ---- adapter names and wrapping ---------------------------------------------------------------------------


def test_add_adapter_with_duplicate_name():
    model = get_peft_model(tiny_llama(), LoraConfig())
    with pytest.raises(ValueError, match=r"adapter named 'default' already exists; delete it first or pick another"):
        model.add_adapter("default", LoraConfig())


def test_adapter_name_with_dot_is_refused():
    model = get_peft_model(tiny_llama(), LoraConfig())
    with pytest.raises(ValueError, match=r"Adapter name 'a\.b' is not valid: it contains a dot"):
        model.add_adapter("a.b", LoraConfig())


@pytest.mark.parametrize("action", ["set_adapter", "delete_adapter"])
def test_unknown_adapter_name_lists_the_known_ones(action):
    model = get_peft_model(tiny_llama(), LoraConfig())
    model.add_adapter("other", LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"No adapter named 'nope'; this model has: \['default', 'other'\]"):
        getattr(model, action)("nope")
    assert model.active_adapters == ["default"]


def test_get_peft_model_on_a_peft_model_points_to_add_adapter():
    model = get_peft_model(tiny_llama(), LoraConfig())
    with pytest.raises(TypeError, match=r"already a PeftModel; use model\.add_adapter\(name, config\)"):
        get_peft_model(model, LoraConfig())


def test_add_weighted_adapter_bad_inputs():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4))
    model.add_adapter("b", LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"combination_type='mean' is not supported for LoRA; use one of"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="mean")
    with pytest.raises(ValueError, match=r"one weight per adapter: got 2 adapters and 1 weights"):
        model.add_weighted_adapter(["default", "b"], [1], "mix")
    with pytest.raises(ValueError, match=r"No adapter named 'c'"):
        model.add_weighted_adapter(["default", "c"], [1, 1], "mix")
    with pytest.raises(ValueError, match=r"combination_type='linear' needs every adapter to have the same rank"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="linear")
    assert sorted(model.peft_config) == ["b", "default"]


# ---- saving -----------------------------------------------------------------------------------------------


def test_save_with_pickle_is_refused_and_writes_nothing(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig())
    with pytest.raises(ValueError, match=r"safe_serialization=False.*safetensors only.*Leave safe_serialization"):
        model.save_pretrained(tmp_path / "out", safe_serialization=False)
    assert not (tmp_path / "out").exists()


def test_crash_while_writing_weights_keeps_previous_adapter_intact(tmp_path, monkeypatch):
    """save_file writes half a file and dies: the folder keeps its previous files byte for byte, they still load
    (same logits as before), and no temporary file is left behind."""
    folder = tmp_path / "adapter"
    first = saved_adapter(folder)
    expected = output_of(first, model_inputs("llama"))
    before = folder_bytes(folder)

    def crashing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)  # a partial header
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save_file)  # adapter_files imports it when writing
    second = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False))
    with pytest.raises(OSError, match="simulated"):
        second.save_pretrained(folder)
    monkeypatch.undo()

    assert folder_bytes(folder) == before  # same files, same bytes: no temp file left, nothing replaced
    reloaded = PeftModel.from_pretrained(tiny_llama(), folder)
    torch.testing.assert_close(output_of(reloaded, model_inputs("llama")), expected, rtol=0, atol=0)


def test_config_that_cannot_be_written_changes_no_file(tmp_path):
    """A config value JSON cannot store fails before the weights are replaced, so the folder never holds new
    weights beside the old config."""
    folder = tmp_path / "adapter"
    saved_adapter(folder)
    before = folder_bytes(folder)
    second = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False))
    second.peft_config["default"].revision = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"cannot be written to adapter_config\.json: revision holds a value JSON "
                                          r"cannot store"):
        second.save_pretrained(folder)
    assert folder_bytes(folder) == before


# ---- loading ----------------------------------------------------------------------------------------------


def test_folder_without_config(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / CONFIG).unlink()
    with pytest.raises(AdapterFileError, match=r"has no adapter_config\.json; it is not an adapter folder \(found: "
                                               r"\['adapter_model\.safetensors'\]\)\. Pass the folder that "
                                               r"save_pretrained wrote"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(AdapterFileError, match=r"No adapter folder at '.*nowhere'. Pass the folder that holds "
                                               r"adapter_config\.json"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")


class _Trap:
    """Unpickling this creates the marker file: proof that the pickle was (or was not) opened."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def write_trap_bin(folder: pathlib.Path, marker: pathlib.Path) -> None:
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(1), "trap": _Trap(str(marker))},
               folder / "adapter_model.bin")


CONVERSION = (r"pickle file, which can run arbitrary code when loaded; peftlab reads only safetensors and did not "
              r"open it\. If you trust its source, convert it once with:\n  python -c \"import torch; "
              r"from safetensors\.torch import save_file; save_file\(torch\.load\('.*adapter_model\.bin', "
              r"weights_only=True\), '.*adapter_model\.safetensors'\)\"")


@pytest.mark.parametrize("with_config", [True, False], ids=["config+bin", "bin-only"])
@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_pickle_weights_are_refused_with_conversion_command_and_never_unpickled(tmp_path, with_config, how):
    folder = tmp_path / "adapter"
    folder.mkdir()
    if with_config:
        LoraConfig(target_modules=["q_proj"]).save_pretrained(folder)
    marker = tmp_path / "unpickled.marker"
    write_trap_bin(folder, marker)

    expect = CONVERSION if with_config else r"has no adapter_config\.json.*" + CONVERSION
    with pytest.raises(AdapterFileError, match=re.compile(expect, re.S)):
        if how == "from_pretrained":
            PeftModel.from_pretrained(tiny_llama(), folder)
        else:
            get_peft_model(tiny_llama(), LoraConfig()).load_adapter(folder, adapter_name="x")
    assert not marker.exists(), "peftlab unpickled adapter_model.bin"

    # The trap is live: unpickling the file does create the marker (so the assertion above can fail).
    torch.load(folder / "adapter_model.bin", weights_only=False)
    assert marker.exists()


def test_damaged_safetensors_file(tmp_path):
    saved_adapter(tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 3])
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors is not a readable safetensors file.*"
                                               r"Save the adapter again"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_shape_mismatch_names_tensors_and_both_shapes(tmp_path):
    """An adapter for hidden_size 32 on a hidden_size 48 base: every wrong tensor is named with both shapes."""
    saved_adapter(tmp_path, model=llama_of_width(32), r=8)
    base = llama_of_width(48)
    names = sorted(base.state_dict())
    with pytest.raises(AdapterFileError, match=(
            r"does not fit this base model\. 8 tensor\(s\) have other shapes than the model's: "
            r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: "
            r"file \(8, 32\) vs model \(8, 48\); "
            r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight: "
            r"file \(32, 8\) vs model \(48, 8\).*"
            r"base_model_name_or_path")):
        PeftModel.from_pretrained(base, tmp_path)
    assert sorted(base.state_dict()) == names, "a failed load must hand the base model back unwrapped"


def test_adapter_from_other_architecture_names_missing_and_unexpected_keys(tmp_path):
    """A llama adapter (q_proj/v_proj under model.layers) on OPT (q_proj/v_proj under model.decoder.layers)."""
    saved_adapter(tmp_path)
    with pytest.raises(AdapterFileError, match=(
            r"8 tensor\(s\) the model expects are not in the file: "
            r"base_model\.model\.model\.decoder\.layers\.0\.self_attn\.q_proj\.lora_A\.weight, .*"
            r"8 tensor\(s\) in the file fit no module of the model: "
            r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight, ")):
        PeftModel.from_pretrained(tiny_opt(), tmp_path)


def test_adapter_whose_targets_are_absent_names_them(tmp_path):
    """A llama adapter on GPT-2: its targets (q_proj, v_proj) do not exist there; the nearest real name is given."""
    saved_adapter(tmp_path)
    with pytest.raises(ConfigError, match=r"target_modules=\['q_proj', 'v_proj'\] matched no module of "
                                          r"GPT2LMHeadModel.*c_attn"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def edit_config(folder: pathlib.Path, **changes) -> None:
    data = json.loads((folder / CONFIG).read_text())
    data.update(changes)
    (folder / CONFIG).write_text(json.dumps(data))


@pytest.mark.parametrize("key", ["use_qalora", "lora_bias"])  # (use_dora=True now loads as DoRA)
def test_peft_feature_we_lack_is_refused_naming_the_key(tmp_path, key):
    saved_adapter(tmp_path)
    edit_config(tmp_path, **{key: False})  # switched off, PEFT's default: accepted
    PeftModel.from_pretrained(tiny_llama(), tmp_path)
    edit_config(tmp_path, **{key: True})
    with pytest.raises(ConfigError, match=rf"adapter_config\.json sets {key}=True, a feature peftlab's LoraConfig does "
                                          rf"not implement.*Remove the key"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_unknown_peft_type_is_refused(tmp_path):
    saved_adapter(tmp_path)
    edit_config(tmp_path, peft_type="FOO")
    with pytest.raises(ValueError, match=r"peft_type='FOO', which no peftlab method reads\. Known types: .*LORA"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_config_without_peft_type_or_not_json(tmp_path):
    saved_adapter(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    del data["peft_type"]
    (tmp_path / CONFIG).write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json has no peft_type"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    (tmp_path / CONFIG).write_text("{ not json")
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json is not valid JSON .*the file is damaged"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_failed_load_adapter_leaves_adapters_as_they_were(tmp_path):
    """load_adapter with a shape mismatch: no half-added adapter, same active adapter, same weights and
    trainable flags, same logits; the name can then be used for a fitting adapter."""
    saved_adapter(tmp_path / "wide", model=llama_of_width(48), target_modules=["q_proj", "o_proj"],
                  modules_to_save=["lm_head"])
    saved_adapter(tmp_path / "fits", r=2, target_modules=["k_proj"])
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    before, logits = snapshot(model), output_of(model, model_inputs("llama"))

    with pytest.raises(AdapterFileError, match=r"have other shapes than the model's"):
        model.load_adapter(tmp_path / "wide", adapter_name="new", is_trainable=True)

    assert list(model.peft_config) == ["default", "second"]
    assert model.active_adapters == ["default"]
    assert_same_snapshot(before, snapshot(model))
    torch.testing.assert_close(output_of(model, model_inputs("llama")), logits, rtol=0, atol=0)
    model.load_adapter(tmp_path / "fits", adapter_name="new")
    assert list(model.peft_config) == ["default", "second", "new"]


def test_loading_a_missing_subfolder_names_it(tmp_path):
    saved_adapter(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(AdapterFileError, match=r"No adapter folder at '.*other'"):
        model.load_adapter(tmp_path, adapter_name="other", subfolder="other")
    assert list(model.peft_config) == ["default"]
