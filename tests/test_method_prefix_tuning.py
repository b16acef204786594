"""Prefix tuning against HF PEFT (`import peft`, the reference) on tiny models.

Invariants checked:
- the config is filled from the model as PEFT fills it (grouped-query attention: token_dim = kv heads x head_dim);
- the same seed gives PEFT's initial prefix (with and without the projection MLP, init_weights="zero");
- the cache handed to the model holds the prefix rows in PEFT's layout ([layer 0 keys | layer 0 values | ...]) in front
  of the real keys, and the real tokens are positioned after the prefix (positions T..);
- the same weights give PEFT's logits (llama, gpt2, bert SEQ_CLS, llama SEQ_CLS, t5), with and without projection;
- files cross both ways with the same logits; keys are PEFT's (+ the projection's weights for a trainable adapter,
  which PEFT ignores); a PEFT file with a projection cannot be trained on and says what to do instead;
- generate equals PEFT's greedy output (llama, t5), with and without the cache, and per row for a left-padded batch;
- it trains through peftlab's Trainer (loss falls, prefix moves, base stays);
- gradient checkpointing and bad values are refused with a message.
"""

from __future__ import annotations

import json

import peft as hf
import pytest
import torch
from safetensors.torch import load_file

from peftlab import AdapterFileError, PeftModel, PrefixTuningConfig, get_peft_model
from peftlab.core.config import ConfigError

from .conftest import run_config, save_tiny, sentences
from .test_method_prompt_tuning import (TASK, TIGHT, WEIGHTS, build, file_shapes, greedy_reference, inputs, logits,
                                        pair, peft_file_config_keys)


pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


def ours(kind="llama", **cfg):
    cfg.setdefault("task_type", TASK[kind])
    cfg.setdefault("num_virtual_tokens", 3)
    return get_peft_model(build(kind), PrefixTuningConfig(**cfg))


def test_config_filled_from_the_model_as_peft_does():
    for kind in ("llama", "gpt2", "bert", "t5"):
        mine = ours(kind, prefix_projection=True).peft_config["default"]
        theirs = hf.get_peft_model(build(kind), hf.PrefixTuningConfig(num_virtual_tokens=3, task_type=TASK[kind],
                                                                    prefix_projection=True)).peft_config["default"]
        for key in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
                    "encoder_hidden_size"):
            assert getattr(mine, key) == getattr(theirs, key), (kind, key)
    llama = ours("llama").peft_config["default"]
    assert (llama.token_dim, llama.num_attention_heads) == (16, 2)  # 2 kv heads x head_dim 8 (the model's q: 4 x 8)


@pytest.mark.parametrize("cfg", [dict(), dict(prefix_projection=True), dict(init_weights="zero"),
                                 dict(prefix_projection=True, init_weights="zero", encoder_hidden_size=8)])
def test_same_seed_gives_peft_initial_prefix(cfg):
    mine = ours(**cfg)
    theirs = hf.get_peft_model(build("llama"), hf.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM",
                                                                    **cfg))
    a, b = mine.prompt_encoder["default"].state_dict(), theirs.prompt_encoder["default"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if cfg.get("init_weights") == "zero":
        assert not mine.prompt_encoder["default"]().any()


def test_cache_holds_the_prefix_in_peft_layout_and_real_tokens_follow_it():
    model = ours("llama")  # T=3 rows of 2 layers x (keys, values) x 2 kv heads x 8
    x = inputs("llama")
    with torch.no_grad():
        cache = model(**x, use_cache=True).past_key_values
        rows = model.prompt_encoder["default"].embedding.weight  # (3, 2 * 2 * 16)
        for layer in range(2):
            keys = rows[:, (2 * layer) * 16:(2 * layer + 1) * 16].view(3, 2, 8).transpose(0, 1)  # (H, T, d)
            values = rows[:, (2 * layer + 1) * 16:(2 * layer + 2) * 16].view(3, 2, 8).transpose(0, 1)
            assert torch.equal(cache.layers[layer].keys[:, :, :3], keys.expand(2, -1, -1, -1))
            assert torch.equal(cache.layers[layer].values[:, :, :3], values.expand(2, -1, -1, -1))
        # Layer 0's real keys depend only on the embeddings and the positions: the base model at positions 3..9.
        base = build("llama")(**x, position_ids=torch.arange(3, 10)[None], use_cache=True).past_key_values
    torch.testing.assert_close(cache.layers[0].keys[:, :, 3:], base.layers[0].keys, rtol=0, atol=0)
    assert cache.get_seq_length() == 3 + 7


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5", "llama_cls"])
@pytest.mark.parametrize("projection", [False, True])
def test_same_logits_as_peft_for_the_same_weights(kind, projection):
    mine, theirs = pair("PrefixTuningConfig", kind, num_virtual_tokens=3, prefix_projection=projection)
    x = inputs(kind)
    torch.testing.assert_close(logits(mine, x), logits(theirs, x), **TIGHT)
    assert not torch.allclose(logits(mine, x), logits(build(kind), x), atol=1e-3)
    if kind in ("llama", "gpt2"):
        assert logits(mine, x).shape == (2, 7, 96)  # prefixes add no positions to the logits


@pytest.mark.parametrize("kind", ["llama", "bert", "t5"])
def test_files_cross_both_ways_without_projection(kind, tmp_path):
    mine, theirs = pair("PrefixTuningConfig", kind, num_virtual_tokens=3)
    x = inputs(kind)
    mine.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    assert file_shapes(tmp_path / "ours") == file_shapes(tmp_path / "peft")
    assert set(json.loads((tmp_path / "ours" / "adapter_config.json").read_text())) == peft_file_config_keys(
        tmp_path / "peft")
    expected = logits(theirs, x)
    into_peft = hf.PeftModel.from_pretrained(build(kind), tmp_path / "ours")
    torch.testing.assert_close(logits(into_peft, x), expected, **TIGHT)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(build(kind), tmp_path / "peft"), x), expected, **TIGHT)
    trainable = PeftModel.from_pretrained(build(kind), tmp_path / "peft", is_trainable=True)  # PEFT refuses this
    torch.testing.assert_close(logits(trainable, x), expected, **TIGHT)


def test_files_with_projection_keep_the_mlp_for_training_and_peft_ignores_it(tmp_path):
    mine, theirs = pair("PrefixTuningConfig", "llama", num_virtual_tokens=3, prefix_projection=True)
    x = inputs("llama")
    expected = logits(theirs, x)
    mine.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    ours_keys, peft_keys = file_shapes(tmp_path / "ours"), file_shapes(tmp_path / "peft")
    assert peft_keys == {"prompt_embeddings": (3, 2 * 2 * 16)}  # the MLP's output, as PEFT saves it
    encoder = {k: v for k, v in ours_keys.items() if k != "prompt_embeddings"}
    assert ours_keys["prompt_embeddings"] == peft_keys["prompt_embeddings"]
    assert set(encoder) == {k.replace(".default.", ".", 1) for k in theirs.state_dict() if k.startswith("prompt_enc")}
    # PEFT reads our file (and ignores the MLP's weights); we read PEFT's for inference, as PEFT does.
    torch.testing.assert_close(logits(hf.PeftModel.from_pretrained(build("llama"), tmp_path / "ours"), x), expected,
                               **TIGHT)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(build("llama"), tmp_path / "peft"), x), expected,
                               **TIGHT)
    # Trainable: ours continues from the MLP itself; PEFT's file has none, which is said with the way out.
    again = PeftModel.from_pretrained(build("llama"), tmp_path / "ours", is_trainable=True)
    for k, t in mine.prompt_encoder["default"].state_dict().items():
        assert torch.equal(again.prompt_encoder["default"].state_dict()[k], t), k
    with pytest.raises(AdapterFileError, match="prefix_projection=False"):
        PeftModel.from_pretrained(build("llama"), tmp_path / "peft", is_trainable=True)
    rows = PeftModel.from_pretrained(build("llama"), tmp_path / "peft", is_trainable=True, config=PrefixTuningConfig(
        num_virtual_tokens=3, task_type="CAUSAL_LM"))
    torch.testing.assert_close(logits(rows, x), expected, **TIGHT)
    # Saved from an inference-mode model: exactly PEFT's file.
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path / "ours")
    loaded.save_pretrained(tmp_path / "again")
    assert file_shapes(tmp_path / "again") == peft_keys


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("projection", [False, True])
def test_generate_equals_peft_greedy(kind, projection):
    mine, theirs = pair("PrefixTuningConfig", kind, num_virtual_tokens=3, prefix_projection=projection)
    x = {k: v for k, v in inputs(kind).items() if k != "decoder_input_ids"}
    a = mine.generate(**x, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, greedy_reference(theirs, x, 6))  # PEFT's forward, decoded greedily
    assert torch.equal(mine.generate(**x, max_new_tokens=6, do_sample=False, use_cache=False), a)
    if kind == "llama":
        assert torch.equal(a[:, 7], logits(mine, x)[:, -1].argmax(-1))
        with mine.disable_adapter():
            assert not torch.equal(mine.generate(**x, max_new_tokens=6, do_sample=False), a)


def test_left_padded_generate_equals_each_row_alone():
    model = ours("llama")
    long, short = inputs("llama")["input_ids"][0], inputs("llama", seed=4, n=4)["input_ids"][0]
    ids = torch.stack([long, torch.cat([torch.zeros(3, dtype=torch.long), short])])
    mask = torch.stack([torch.ones(7, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1, 1, 1])])
    both = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, alone in ((0, long), (1, short)):
        one = model.generate(input_ids=alone[None], attention_mask=torch.ones(1, len(alone), dtype=torch.long),
                             max_new_tokens=5, do_sample=False)
        assert torch.equal(both[row, -5:], one[0, -5:]), row


def test_trains_through_the_trainer(tmp_path):
    from peftlab.train import Trainer

    model_dir = save_tiny(tmp_path / "llama", "llama")
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(sentences(40)))
    method = {"name": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True}
    trainer = Trainer(run_config(model_dir, "causal_lm", str(txt), tmp_path / "run", lr=2e-2, method=method),
                      log=lambda *_: None)
    model = trainer.peft_model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {k: t.detach().clone() for k, t in model.prompt_encoder["default"].state_dict().items()}
    result = trainer.fit()
    assert result["after"]["loss"] < result["before"]["loss"] - 0.05, result
    assert all(not torch.equal(t, before[k]) for k, t in model.prompt_encoder["default"].state_dict().items())
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    saved = load_file(str(tmp_path / "run" / "adapter" / WEIGHTS))
    torch.testing.assert_close(saved["prompt_embeddings"], model.prompt_encoder["default"]().detach(), rtol=0, atol=0)


def test_gradient_checkpointing_is_refused():
    base = build("llama")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    model = ours("llama")
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**inputs("llama"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens=0 is not valid"),
    (dict(num_virtual_tokens=2, init_weights="ones"), "init_weights='ones' is not valid"),
    (dict(num_virtual_tokens=2, encoder_hidden_size=0), "encoder_hidden_size=0 is not valid"),
    (dict(num_virtual_tokens=2, layers_to_transform=[0]), "does not wrap modules"),
])
def test_config_errors_say_what_to_do(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PrefixTuningConfig(**kwargs)


def test_a_token_dim_that_does_not_fit_grouped_query_attention_is_refused():
    with pytest.raises(ConfigError, match="needs token_dim=16 and num_attention_heads=2"):
        get_peft_model(build("llama"), PrefixTuningConfig(num_virtual_tokens=2, token_dim=32))
