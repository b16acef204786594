"""LoRA's math against few-line formulas written out here, target matching rules, several adapters, and the
method contract's hooks (exercised by a toy method registered only inside these tests)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from peftlab import LoraConfig, TaskType, get_peft_model
from peftlab.core.config import AdapterConfig, ConfigError, field_docs
from peftlab.core.layer import AdapterLayer
from peftlab.core.method import _REGISTRY, Method, register

from .conftest import BUILDERS, model_inputs, output_of, tiny_gpt2, tiny_llama


def _random_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.adapter_tensors("default").values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)


# ---- the forward formula, per layer kind ---------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_formula(rslora):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 7))
    x = torch.randn(4, 10)
    W, b = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    model = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_rslora=rslora))
    _random_lora(model)
    layer = model.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = 6 / math.sqrt(3) if rslora else 6 / 3
    expected = x @ W.T + b + s * (x @ A.T @ B.T)
    torch.testing.assert_close(model(x), expected)


def test_conv1d_fan_in_fan_out_matches_formula():
    """GPT-2's Conv1D stores W as (in, out): y = x W + b + s x A^T B^T."""
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, lora_alpha=4))
    _random_lora(model)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out
    x = torch.randn(3, 32)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), x @ W + b + 2.0 * (x @ A.T @ B.T))
    torch.testing.assert_close(layer.delta_weight("default"), 2.0 * (B @ A).T)


def test_embedding_matches_formula():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=2, target_modules=["embed_tokens"]))
    _random_lora(model)
    layer = model.base_model.model.model.embed_tokens
    ids = torch.tensor([[1, 5, 7]])
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]  # (r, vocab), (dim, r)
    expected = layer.base_layer.weight[ids] + 1.0 * (A.T[ids] @ B.T)
    torch.testing.assert_close(layer(ids), expected)


def test_conv2d_matches_formula_and_merge():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, kernel_size=3, padding=1))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    _random_lora(model)
    layer = model.base_model.model[0]
    x = torch.randn(2, 3, 6, 6)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = layer.base_layer(x) + 2.0 * B(A(x))
    torch.testing.assert_close(model(x), expected)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_acts_on_the_adapter_branch_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=4, lora_dropout=0.5, target_modules=["0"]))
    _random_lora(model)
    model.train()
    layer = model.base_model.model[0]
    x = torch.randn(8, 16)
    torch.manual_seed(123)
    y = model(x)
    torch.manual_seed(123)
    dropped = nn.functional.dropout(x, 0.5, training=True)  # the same mask, drawn the same way
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(y, layer.base_layer(x) + dropped @ A.T @ B.T)


def test_rank_and_alpha_patterns_apply_per_module():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                                                    alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}))
    layers = model.base_model.model.model.layers
    assert layers[0].self_attn.v_proj.r["default"] == 2 and layers[0].self_attn.q_proj.r["default"] == 4
    assert layers[1].self_attn.q_proj.scaling["default"] == pytest.approx(3 / 4)
    assert layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 4)


# ---- which modules get adapted ---------------------------------------------------------------------------

def _targets(model):
    return sorted(n for n, _ in model.adapter_layers())


@pytest.mark.parametrize("arch,expected", [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}),
                                           ("bert", {"query", "value"}), ("t5", {"q", "v"})])
def test_default_targets_per_architecture(arch, expected):
    model = get_peft_model(BUILDERS[arch](), LoraConfig())
    assert {n.rsplit(".", 1)[-1] for n in _targets(model)} == expected


def test_list_entries_match_whole_name_parts_and_a_string_is_a_full_regex():
    assert len(_targets(get_peft_model(tiny_llama(), LoraConfig(target_modules=["self_attn.q_proj"])))) == 2
    with pytest.raises(ConfigError, match="matched no module"):  # "proj" is no suffix after a dot
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["proj"]))
    with pytest.raises(ConfigError, match="matched no module"):  # a string must match the whole name
        get_peft_model(tiny_llama(), LoraConfig(target_modules="q_proj"))
    regex = _targets(get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*\.0\.self_attn\.(q|k)_proj")))
    assert regex == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]


def test_all_linear_skips_the_output_head_and_exclusions_and_layer_filter_apply():
    names = _targets(get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear")))
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    names = _targets(get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"],
                                                             layers_to_transform=[1])))
    assert len(names) == 6 and all(".layers.1." in n and "o_proj" not in n for n in names)


def test_seq_cls_task_keeps_the_head_trainable_and_saved():
    model = get_peft_model(BUILDERS["bert"](), LoraConfig(task_type=TaskType.SEQ_CLS))
    assert "classifier" in model.peft_config["default"].modules_to_save
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    assert "base_model.model.classifier.weight" in model.adapter_tensors("default")


# ---- several adapters on one base ------------------------------------------------------------------------

def test_switching_adapters_changes_output_and_trainable_set():
    x = model_inputs("llama")
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=3, init_lora_weights=False))
    out_default = output_of(model, x)
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    model.set_adapter("other")
    out_other = output_of(model, x)
    assert not torch.allclose(out_default, out_other)
    assert all(p.requires_grad == (".other." in n) for n, p in model.named_parameters() if "lora_" in n)
    model.set_adapter("default")
    torch.testing.assert_close(output_of(model, x), out_default, rtol=0, atol=0)
    model.delete_adapter("default")
    assert model.active_adapter == "other" and list(model.peft_config) == ["other"]
    torch.testing.assert_close(output_of(model, x), out_other, rtol=0, atol=0)


def test_two_active_adapters_add_their_updates():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False))
    model.set_adapter(["default", "b"])
    layer, x = model.base_model.model[0], torch.randn(3, 6)
    expected = layer.base_layer(x) + x @ layer.delta_weight("default").T + x @ layer.delta_weight("b").T
    torch.testing.assert_close(model(x), expected)


def test_delete_last_adapter_on_a_module_restores_the_original_module():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("k", LoraConfig(target_modules=["k_proj"]))
    model.delete_adapter("k")
    attn = model.base_model.model.model.layers[0].self_attn
    assert type(attn.k_proj) is nn.Linear and isinstance(attn.q_proj, AdapterLayer)


# ---- weighted combination --------------------------------------------------------------------------------

def _two_adapter_layer(r1=2, r2=3):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 5))
    model = get_peft_model(net, LoraConfig(r=r1, lora_alpha=2, target_modules=["0"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=r2, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    return model, model.base_model.model[0]


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_weighted_cat_and_svd_equal_the_weighted_sum_of_updates(kind):
    model, layer = _two_adapter_layer()
    w = [0.7, -1.3]
    expected = w[0] * layer.delta_weight("default") + w[1] * layer.delta_weight("b")
    model.add_weighted_adapter(["default", "b"], w, "mix", combination_type=kind, svd_rank=5)
    torch.testing.assert_close(layer.delta_weight("mix"), expected, rtol=1e-5, atol=1e-5)
    assert layer.r["mix"] == 5 and layer.scaling["mix"] == 1.0


def test_weighted_linear_follows_its_formula():
    model, layer = _two_adapter_layer(r1=2, r2=2)
    w = [0.5, -2.0]
    parts = [(layer.lora_pair(a), wi * layer.scaling[a]) for a, wi in zip(["default", "b"], w)]
    A = sum(math.copysign(math.sqrt(abs(c)), c) * pa for (pa, _), c in parts)
    B = sum(math.sqrt(abs(c)) * pb for (_, pb), c in parts)
    model.add_weighted_adapter(["default", "b"], w, "mix", combination_type="linear")
    torch.testing.assert_close(layer.delta_weight("mix"), B @ A)
    with pytest.raises(ValueError, match="same rank"):
        _two_adapter_layer(2, 3)[0].add_weighted_adapter(["default", "b"], w, "m2", combination_type="linear")


# ---- the method contract: a toy method exercising every hook -----------------------------------------------

@dataclasses.dataclass
class ScaleConfig(AdapterConfig):
    """Toy method: y = base(x) * (1 + v), v a trainable vector per layer."""

    peft_type = "TOY_SCALE"
    lr_ratio: float = 10.0
    """Learning-rate multiplier the toy method asks for through param_groups."""


class ScaleLayer(AdapterLayer):
    adapter_containers = ("scale_v",)

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.scale_v = nn.ParameterDict()

    def add_adapter(self, adapter_name, config, module_name):
        self.scale_v[adapter_name] = nn.Parameter(torch.zeros(self.base_layer.out_features))

    def adapter_tensors(self, adapter_name):
        return {"scale_v": self.scale_v[adapter_name]}

    def forward(self, x):
        y = self.base_layer(x)
        for a in self.live_adapters():
            y = y * (1 + self.scale_v[a])
        return y


@pytest.fixture
def toy_method():
    calls = {"steps": []}
    method = register(Method(
        name="toy_scale", config_cls=ScaleConfig, layers=((nn.Linear, ScaleLayer),),
        param_groups=lambda model, adapter, params, lr: [
            {"params": [p for _, p in params], "lr": lr * model.peft_config[adapter].lr_ratio}],
        on_step=lambda model, adapter, step: calls["steps"].append((adapter, step)),
        extra_loss=lambda model, adapter: sum(t.pow(2).sum() for t in model.adapter_tensors(adapter).values()),
    ))
    yield method, calls
    del _REGISTRY["toy_scale"]


def test_core_runs_a_new_method_through_its_declared_hooks(toy_method, tmp_path):
    _, calls = toy_method
    model = get_peft_model(tiny_llama(), ScaleConfig(target_modules=["o_proj"]))
    groups = model.optimizer_param_groups(lr=1e-3)
    assert [g["lr"] for g in groups] == [1e-2] and len(groups[0]["params"]) == 2
    model.on_step(7)
    assert calls["steps"] == [("default", 7)]
    with torch.no_grad():
        for t in model.adapter_tensors("default").values():
            t.fill_(0.5)
    assert model.extra_loss().item() == pytest.approx(2 * 32 * 0.25)
    model.save_pretrained(tmp_path)
    from peftlab import PeftModel

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert type(loaded.peft_config["default"]) is ScaleConfig
    x = model_inputs("llama")
    torch.testing.assert_close(output_of(loaded, x), output_of(model, x))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()


def test_field_docs_come_from_the_string_under_each_field():
    docs = field_docs(LoraConfig)
    assert docs["r"].startswith("Rank of the update")
    assert "regular expression" in docs["target_modules"]  # inherited from AdapterConfig
    assert set(docs) >= {f.name for f in dataclasses.fields(LoraConfig)}
