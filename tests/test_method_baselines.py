"""The classic baselines as methods: full, bitfit, head_only, last_layers.

Each trains exactly the parameters its definition names (counted against an independent enumeration of the
model), nothing else gets gradients, its file holds exactly those tensors, and it trains through `peftlab train`.
The generic invariants (save -> load, disable, only owned tensors get gradients, ...) are in test_conformance.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from peftlab import ConfigError, PeftModel, TaskType, get_peft_model
from peftlab.methods.bitfit import BitFitConfig
from peftlab.methods.full import FullConfig
from peftlab.methods.head_only import HeadOnlyConfig
from peftlab.methods.last_layers import LastLayersConfig
from peftlab.train import train

from .conftest import model_inputs, run_config, save_tiny, sentences, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5
from .conftest import write_jsonl


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- what each baseline trains ----------------------------------------------------------------------------------

def test_full_trains_every_parameter_and_exclude_modules_keeps_some_frozen():
    base = tiny_llama()
    n_all = _numel(base)  # tied weights counted once, as named_parameters lists them
    model = get_peft_model(base, FullConfig(task_type=TaskType.CAUSAL_LM))
    assert _trainable(model) == n_all

    base = tiny_llama()
    frozen = base.model.embed_tokens.weight.numel()
    model = get_peft_model(base, FullConfig(exclude_modules=["embed_tokens"]))
    assert _trainable(model) == n_all - frozen
    assert not model.base_model.model.model.embed_tokens.weight.requires_grad


def test_full_file_holds_the_whole_model_under_its_own_names(tmp_path):
    base = tiny_gpt2()
    names = {n for n, _ in base.named_parameters()}
    model = get_peft_model(base, FullConfig())
    model.save_pretrained(tmp_path)
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{n}" for n in names}


def test_only_one_adapter_may_train_base_weights_in_place():
    model = get_peft_model(tiny_gpt2(), FullConfig())
    with pytest.raises(ValueError, match="in place.*already does"):
        model.add_adapter("second", BitFitConfig())


def test_bitfit_trains_exactly_the_biases():
    base = tiny_bert_cls()
    biases = {n for n, _ in base.named_parameters() if n.endswith(".bias") and not n.startswith("classifier.")}
    head = {n for n, _ in base.classifier.named_parameters()}
    model = get_peft_model(base, BitFitConfig(task_type=TaskType.SEQ_CLS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.removeprefix("base_model.model.") for n in trainable if ".modules_to_save." not in n} == biases
    assert {n.rsplit(".modules_to_save.default.", 1)[1] for n in trainable if ".modules_to_save." in n} == head


def test_bitfit_subset_and_models_without_biases():
    model = get_peft_model(tiny_bert_cls(), BitFitConfig(target_modules=["query"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("query.bias") for n in trainable)
    with pytest.raises(ConfigError, match="no bias parameter.*llama.*ia3 or lora"):
        get_peft_model(tiny_llama(), BitFitConfig())


def test_head_only_trains_a_copy_of_the_lm_head_and_leaves_a_tied_embedding_alone():
    base = tiny_llama()
    base.config.tie_word_embeddings = True
    base.tie_weights()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    embedding = base.model.embed_tokens.weight.detach().clone()
    model = get_peft_model(base, HeadOnlyConfig(task_type=TaskType.CAUSAL_LM))
    assert _trainable(model) == base.lm_head.weight.numel()
    x = model_inputs("llama")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    assert torch.equal(model.base_model.model.model.embed_tokens.weight, embedding), "input embedding must stay"


def test_head_only_finds_the_task_head():
    model = get_peft_model(tiny_bert_cls(), HeadOnlyConfig(task_type=TaskType.SEQ_CLS))
    assert _trainable(model) == _numel(tiny_bert_cls().classifier)
    model = get_peft_model(tiny_bert_cls(), HeadOnlyConfig())  # no task_type: the usual head name is found
    assert _trainable(model) == _numel(tiny_bert_cls().classifier)


def test_head_only_without_a_head_says_what_to_do():
    with pytest.raises(ConfigError, match="no output layer.*AutoModelForCausalLM"):
        get_peft_model(tiny_llama().model, HeadOnlyConfig())


def test_last_layers_trains_the_top_blocks_and_the_head():
    base = tiny_llama()
    n_layers = len(base.model.layers)
    want = _numel(base.model.layers[n_layers - 1]) + _numel(base.lm_head)
    model = get_peft_model(base, LastLayersConfig(num_layers=1, task_type=TaskType.CAUSAL_LM))
    assert _trainable(model) == want
    # Gradients reach only the top block's copy: the lower block is frozen and gets none.
    x = model_inputs("llama")
    model(**x, labels=x["input_ids"]).loss.backward()
    inner = model.base_model.model.model.layers
    assert all(p.grad is None for p in inner[0].parameters())
    assert all(p.grad is not None for p in inner[n_layers - 1].modules_to_save["default"].parameters())


def test_last_layers_on_t5_takes_the_top_of_encoder_and_decoder():
    base = tiny_t5()
    want = _numel(base.encoder.block[-1]) + _numel(base.decoder.block[-1])
    model = get_peft_model(base, LastLayersConfig(num_layers=1, train_head=False))
    assert _trainable(model) == want


def test_last_layers_errors():
    with pytest.raises(ConfigError, match="num_layers=9 but .* has only 2 blocks"):
        get_peft_model(tiny_llama(), LastLayersConfig(num_layers=9))
    with pytest.raises(ConfigError, match="num_layers"):
        LastLayersConfig(num_layers=0)
    with pytest.raises(ConfigError, match="blocks_name='<name>'"):
        get_peft_model(tiny_llama(), LastLayersConfig(blocks_name="stack"))


# ---- through the training loop ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [
    {"name": "full"},
    {"name": "head_only"},
    {"name": "last_layers", "num_layers": 1},
])
def test_baselines_train_through_peftlab_train_and_reload(tmp_path, method):
    model_dir = save_tiny(tmp_path / "llama", "llama")
    rows = [{"text": f"{w} {s}", "label": w} for s in sentences(24, seed=3) for w in ["positive", "negative"]]
    out = tmp_path / "run"
    lr = 1e-3 if method["name"] == "full" else 1e-2
    result = train(run_config(model_dir, "classify", write_jsonl(tmp_path / "d.jsonl", rows), out, method=method,
                              max_steps=20, lr=lr), log=lambda *_: None)
    assert result["after"]["loss"] < result["before"]["loss"], result
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, out / "adapter")
    saved = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    for key, tensor in loaded.adapter_tensors("default").items():
        assert torch.equal(tensor, saved[key]), key
