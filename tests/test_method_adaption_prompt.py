"""LLaMA-Adapter against HF PEFT 0.21.2's ADAPTION_PROMPT (which runs under transformers 5.25 for Llama): the same
initial prompts from the same seed and the same logits, PEFT's config values and file keys, greedy generation of
PEFT's file equal to PEFT's own; the adapted layer's output checked against the paper's equations computed by hand.
Files crossing both ways and the generic invariants run on the method's examples in tests/test_conformance.py.
"""

from __future__ import annotations

import json
import math

import peft as hf
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab import get_peft_model
from peftlab.core.config import ConfigError
from peftlab.methods.adaption_prompt import AdaptedAttention, AdaptionPromptConfig

from .conftest import model_inputs, output_of, tiny_gpt2, tiny_llama
from .peft_parity import TIGHT, randomise_trainable

pytestmark = pytest.mark.usefixtures("quiet_warnings")  # transformers' notes on the tiny configs

X = model_inputs("llama")


@pytest.mark.parametrize("layers", [1, 2])
def test_same_seed_gives_peft_s_prompts_and_logits(layers):
    config = dict(adapter_len=3, adapter_layers=layers, task_type="CAUSAL_LM")
    models = []
    for lib, config_cls in ((peftlab, AdaptionPromptConfig), (hf, hf.AdaptionPromptConfig)):
        base = tiny_llama()  # (seeds itself) then the same seed for the prompts in both
        torch.manual_seed(7)
        models.append(lib.get_peft_model(base, config_cls(**config)))
    ours, theirs = models
    # parameter names differ by the adapter name (ours: `adaption_prompt.default`); the file keys do not
    a, b = ours.adapter_state_dict(), hf.get_peft_model_state_dict(theirs)
    assert a.keys() == b.keys() and len(a) == 2 * layers
    assert all(torch.equal(a[k], b[k]) for k in a)
    for model, seed in ((ours, 3), (theirs, 3)):
        randomise_trainable(model, seed=seed, scale=0.5)
    torch.testing.assert_close(output_of(ours, X), output_of(theirs, X), **TIGHT)


def test_peft_s_file_generates_peft_s_tokens_and_ours_holds_peft_s_keys(tmp_path):
    config = dict(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM")
    theirs = hf.get_peft_model(tiny_llama(), hf.AdaptionPromptConfig(**config))
    randomise_trainable(theirs, seed=2, scale=0.5)  # opens the gates
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    expected = output_of(theirs, X)
    assert not torch.allclose(expected, output_of(tiny_llama(), X), atol=1e-3)
    torch.testing.assert_close(output_of(ours, X), expected, **TIGHT)
    prompt = X["input_ids"][:1]  # greedy decoding with the KV cache: the prompts act at every step
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=prompt, **greedy), theirs.generate(input_ids=prompt, **greedy))

    ours.save_pretrained(tmp_path / "ours")
    saved = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    assert (saved["peft_type"], saved["target_modules"], saved["adapter_len"], saved["adapter_layers"]) == \
        ("ADAPTION_PROMPT", "self_attn", 3, 2)
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys()


def _open_gates(model, seed):
    randomise_trainable(model, seed=seed, scale=0.5)


def test_adapted_layer_computes_the_paper_equations():
    model = get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=4, adapter_layers=1))
    _open_gates(model, 3)
    layer = model.get_base_model().model.layers[1].self_attn
    assert isinstance(layer, AdaptedAttention)
    seen = {}

    def grab(module, args, kwargs, output):
        seen.update(h=kwargs["hidden_states"], rope=kwargs["position_embeddings"], out=output[0])

    handle = layer.register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**X)
        with model.disable_adapter():  # the plain attention output on the same input
            base_out = layer.base_layer(hidden_states=seen["h"], position_embeddings=seen["rope"])[0]
    handle.remove()
    attn, P, g = layer.base_layer, layer.adaption_prompt["default"][0], layer.adaption_gate["default"]
    h, (cos, sin) = seen["h"], seen["rope"]
    H, d = 4, 8
    B, T, _ = h.shape
    with torch.no_grad():
        q = (h @ attn.q_proj.weight.t()).view(B, T, H, d)  # (B, T, H, d), rotated by hand: q cos + rot(q) sin
        q = q * cos[:, :, None] + torch.cat([-q[..., d // 2:], q[..., :d // 2]], -1) * sin[:, :, None]
        k = (P @ attn.k_proj.weight.t()).view(4, 2, d).repeat_interleave(2, dim=1)  # (K, H, d): 2 KV heads -> 4
        v = (P @ attn.v_proj.weight.t()).view(4, 2, d).repeat_interleave(2, dim=1)
        s = torch.einsum("bthd,khd->bhtk", q, k) / math.sqrt(d)
        branch = torch.einsum("bhtk,khd->bthd", g * s.softmax(-1), v).reshape(B, T, H * d)
        expected = base_out + branch @ attn.o_proj.weight.t()
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


def test_bad_configs_say_what_to_do():
    with pytest.raises(ConfigError, match="adapter_len is not set"):
        AdaptionPromptConfig(adapter_layers=1)
    with pytest.raises(ConfigError, match="set adapter_layers to at most 2"):
        get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    with pytest.raises(ConfigError, match="supports Llama-like models"):
        get_peft_model(tiny_gpt2(), AdaptionPromptConfig(adapter_len=2, adapter_layers=1))


@pytest.mark.parametrize("task", ["classify", "reward"])
def test_a_task_that_trains_a_new_head_is_refused_before_any_model_loads(task):
    """The task's new head would be lost: PEFT's ADAPTION_PROMPT files hold no modules_to_save. The run config says
    so (torch-free, so `peftlab compare` refuses the whole config before its first method runs)."""
    from peftlab.train import build_run_config

    raw = {"model": "no/such/model", "task": task, "data": {"train_file": "rows.jsonl"},
           "method": {"name": "adaption_prompt", "adapter_len": 4, "adapter_layers": 1}}
    with pytest.raises(ConfigError, match=f"cannot save the new head that task {task} trains.*causal_lm or sft"):
        build_run_config(raw)
    assert build_run_config({**raw, "task": "sft"}).method_name == "adaption_prompt"
