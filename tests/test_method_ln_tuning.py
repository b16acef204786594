"""LN tuning against HF PEFT 0.21.2's LN_TUNING: the same default targets, trained tensors and counts, and the same
merged model; the copy computes the norm with its own parameters and merging writes them into the base. Files
crossing both ways (same keys, same logits) and the generic invariants run on the method's examples in
tests/test_conformance.py.
"""

from __future__ import annotations

import peft as hf
import pytest
import torch

from peftlab import get_peft_model
from peftlab.core.config import ConfigError
from peftlab.methods.ln_tuning import LNTuningConfig, LNTuningLayer
from peftlab.methods.ln_tuning.config import DEFAULT_TARGETS
from peftlab.methods.ln_tuning.examples import EXAMPLES

from .conftest import BUILDERS, model_inputs, output_of
from .peft_parity import TIGHT, randomise_trainable

# PEFT warns about its own defaults, transformers about the tiny configs' token ids.
pytestmark = pytest.mark.usefixtures("quiet_warnings")


def test_default_targets_are_peft_s():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as PEFT_TARGETS

    assert DEFAULT_TARGETS == PEFT_TARGETS


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_same_trained_tensors_and_merged_model_as_peft(example, tmp_path):
    x = model_inputs(example.arch)
    config = example.make_config()
    ours = get_peft_model(BUILDERS[example.arch](), config)
    theirs = hf.get_peft_model(BUILDERS[example.arch](),
                               hf.LNTuningConfig(task_type=config.task_type, target_modules=config.target_modules))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    randomise_trainable(ours, seed=1)
    ours.save_pretrained(tmp_path)
    in_peft = hf.PeftModel.from_pretrained(BUILDERS[example.arch](), tmp_path)
    merged_ours, merged_theirs = ours.merge_and_unload(), in_peft.merge_and_unload()
    torch.testing.assert_close(output_of(merged_ours, x), output_of(merged_theirs, x), **TIGHT)
    # (PEFT's LN-tuning unload leaves a SEQ_CLS head's modules_to_save wrapper in place: compare the names both have)
    theirs_sd = merged_theirs.state_dict()
    shared = [n for n in merged_ours.state_dict() if n in theirs_sd]
    assert len(shared) >= len(theirs_sd) - 4
    for n in shared:
        assert torch.equal(merged_ours.state_dict()[n], theirs_sd[n]), n


def test_copy_replaces_the_norm_and_merge_writes_its_values_into_the_base():
    model = get_peft_model(BUILDERS["gpt2"](), LNTuningConfig())
    layer = model.get_base_model().transformer.ln_f
    assert isinstance(layer, LNTuningLayer)
    randomise_trainable(model)
    h = torch.randn(2, 3, 32)
    copy = layer.ln_tuning_layers["default"]
    expected = torch.nn.functional.layer_norm(h, (32,), copy.weight, copy.bias, layer.base_layer.eps)
    torch.testing.assert_close(layer(h), expected, rtol=0, atol=1e-6)
    original = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert torch.equal(layer.base_layer.weight, copy.weight) and torch.equal(layer.base_layer.bias, copy.bias)
    torch.testing.assert_close(layer(h), expected, rtol=0, atol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, original)


def test_bf16_base_trains_fp32_copies_and_hands_on_bf16():
    model = get_peft_model(BUILDERS["llama"]().to(torch.bfloat16), LNTuningConfig())
    layer = model.get_base_model().model.norm
    assert layer.ln_tuning_layers["default"].weight.dtype == torch.float32
    assert layer(torch.randn(2, 3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert model(**model_inputs("llama")).logits.dtype == torch.bfloat16


def test_one_adapter_at_a_time_per_module():
    model = get_peft_model(BUILDERS["llama"](), LNTuningConfig())
    model.add_adapter("other", LNTuningConfig())
    model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="activate one"):
        model(**model_inputs("llama"))
    with pytest.raises(ValueError, match="only one adapter can be merged"):
        model.merge_adapter()


def test_bad_targets_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="ln_tuning cannot adapt"):
        get_peft_model(BUILDERS["llama"](), LNTuningConfig(target_modules=["act_fn"]))
    with pytest.raises(ConfigError, match="Name the layers in target_modules"):
        LNTuningConfig(layers_to_transform=[0])
