"""Selective fine-tuning (FISH mask): scores, selection and the sparse delta checked against straightforward
computations of the paper's equations, and the prepare phase inside `peftlab train`.

- a layer's output and its values' gradient equal plain autograd through a dense W + scatter(values) (nn.Linear and
  GPT-2's Conv1D), and merging adds exactly that dense delta;
- fisher_scores equals (1/N) Σ_n (∂ℓ_n/∂W)^2 computed example by example with torch.autograd.grad on a plain
  transformers model holding W + delta (Sung et al. 2021, eq. 2-3);
- the selection equals a sort of all (layer, entry, score) triples: global top-k, per-tensor top-k, threshold;
  re-selection keeps the values of entries kept again;
- files of any k per layer load back exactly; a damaged index list is refused with one clear error;
- `peftlab train` scores, selects (2 rounds), prints and saves the per-layer table, trains, and saves a file that
  loads back; the base weights stay as they were.
No HF PEFT parity: PEFT has no such method. The generic invariants run on the method's examples in
tests/test_conformance.py.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import peftlab
from peftlab import get_peft_model
from peftlab.cli.main import main
from peftlab.io.adapter_files import AdapterFileError
from peftlab.methods.selective import (SELECTION_FILE, SelectiveConfig, fisher_scores, select, select_entries,
                                       selective_layers)
from peftlab.train import Trainer

from .conftest import model_inputs, output_of, run_config, sentences, straight_and_resumed, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("quiet_warnings")  # transformers' notes on the tiny configs' token ids


def _random_values(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in selective_layers(model):
            v = layer.selective_values["default"]
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)


def _dense_delta(layer):
    """The delta as a dense tensor of the weight's stored shape, by plain indexing."""
    w = layer.base_layer.weight
    delta = torch.zeros(w.numel())
    delta[layer.selective_indices["default"].long()] = layer.selective_values["default"].detach()
    return delta.view(w.shape)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_forward_gradient_and_merge_equal_a_dense_delta(build):
    model = get_peft_model(build(), SelectiveConfig(density=0.2))
    _random_values(model)
    for path, layer in selective_layers(model):
        w, b = layer.base_layer.weight.detach(), layer.base_layer.bias
        x = torch.randn(2, 5, layer.base_layer.weight.shape[1 if not layer.transposed else 0])
        values = layer.selective_values["default"]
        idx = layer.selective_indices["default"].long()
        # reference: autograd through W + a dense scatter of an independent copy of the values
        ref_values = values.detach().clone().requires_grad_(True)
        dense = torch.zeros(w.numel()).index_put((idx,), ref_values).view(w.shape)
        ref = x @ (w + dense) if layer.transposed else x @ (w + dense).t()
        ref = ref + b if b is not None else ref
        out = layer(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=path)
        target = torch.randn(out.shape)
        (out * target).sum().backward()
        (ref * target).sum().backward()
        torch.testing.assert_close(values.grad, ref_values.grad, rtol=1e-5, atol=1e-6, msg=path)
        expected = w + _dense_delta(layer)
        layer.merge(["default"])
        torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-7, msg=path)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, w, rtol=0, atol=1e-7, msg=path)


def _examples(n=3):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 96, (n, 7), generator=g)
    return [{"input_ids": ids[i:i + 1], "labels": ids[i:i + 1]} for i in range(n)]


def test_fisher_scores_are_mean_squared_per_example_gradients_at_the_current_weights():
    model = get_peft_model(tiny_llama(), SelectiveConfig(density=0.1, target_modules=["q_proj", "down_proj"]))
    _random_values(model)
    model.train()  # scoring runs in eval mode whatever the mode (tiny Llama has no dropout: same either way)
    batches = _examples()
    scores = fisher_scores(model, batches)

    plain = tiny_llama()  # the same base, with W + delta written into its weights
    with torch.no_grad():
        for path, layer in selective_layers(model):
            plain.get_submodule(path).weight.add_(_dense_delta(layer))
    weights = {path: plain.get_submodule(path).weight for path in scores}
    expected = {path: torch.zeros_like(w) for path, w in weights.items()}
    for batch in batches:
        loss = plain(**batch).loss
        grads = torch.autograd.grad(loss, list(weights.values()))
        for path, g in zip(weights, grads):
            expected[path] += g.pow(2) / len(batches)
    assert set(scores) == set(expected) and len(scores) == 4
    for path in scores:
        torch.testing.assert_close(scores[path], expected[path], rtol=1e-4, atol=1e-12, msg=path)
    assert model.training and all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert {id(p) for p in model.parameters() if p.requires_grad} == \
        {id(t) for t in model.trainable_tensors("default").values()}


def test_a_bf16_base_with_a_new_fp32_head_is_scored_under_autocast():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.LlamaForSequenceClassification(config).to(torch.bfloat16)
    model = get_peft_model(base, SelectiveConfig(density=0.05, task_type="SEQ_CLS"))  # the head trains in fp32
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    scores = fisher_scores(model, [{"input_ids": ids[i:i + 1], "labels": torch.tensor([i])} for i in range(2)])
    assert len(scores) == 14 and all(s.dtype == torch.float32 and bool(torch.isfinite(s).all()) for s in
                                     scores.values())
    assert sum(float(s.sum()) for s in scores.values()) > 0


def _triples(scores):
    return sorted(((float(s), path, i) for path, t in scores.items() for i, s in enumerate(t.view(-1).tolist())),
                  reverse=True)


def _selected(model):
    return {(path, int(i)) for path, layer in selective_layers(model)
            for i in layer.selective_indices["default"].tolist()}


@pytest.mark.parametrize("rule", ["global", "per_tensor", "threshold"])
def test_selection_keeps_the_entries_a_plain_sort_keeps(rule):
    model = get_peft_model(tiny_llama(), SelectiveConfig(density=0.1))
    g = torch.Generator().manual_seed(1)
    scores = {path: torch.rand(layer.base_layer.weight.shape, generator=g) ** 4  # distinct, skewed
              for path, layer in selective_layers(model)}
    density = 0.03
    if rule == "global":
        triples = _triples(scores)
        want = {(p, i) for _, p, i in triples[:round(density * len(triples))]}
        rows = select_entries(model, scores, density=density)
    elif rule == "per_tensor":
        want = set()
        for path, t in scores.items():
            want |= {(p, i) for _, p, i in _triples({path: t})[:round(density * t.numel())]}
        rows = select_entries(model, scores, density=density, scope="per_tensor")
    else:
        want = {(p, i) for s, p, i in _triples(scores) if s >= 0.5}
        rows = select_entries(model, scores, threshold=0.5)
    assert _selected(model) == want
    assert [r["layer"] for r in rows] == [p for p, _ in selective_layers(model)]
    for row in rows:
        chosen = [i for p, i in want if p == row["layer"]]
        assert row["selected"] == len(chosen) and row["fraction"] == len(chosen) / row["entries"]
        assert row["fisher_share"] == pytest.approx(float(scores[row["layer"]].view(-1)[chosen].sum()) /
                                                    float(scores[row["layer"]].sum()))
    if rule == "global":  # global ranking: layers get different k
        assert len({r["selected"] for r in rows}) > 1


def test_reselection_keeps_the_values_of_entries_kept_again():
    model = get_peft_model(tiny_llama(), SelectiveConfig(density=0.1))
    _random_values(model)
    path, layer = selective_layers(model)[0]
    old = dict(zip(layer.selective_indices["default"].tolist(), layer.selective_values["default"].tolist()))
    kept_old = sorted(old)[:5]
    scores = {p: torch.zeros(l.base_layer.weight.shape) for p, l in selective_layers(model)}
    scores[path].view(-1)[kept_old] = 2.0  # five old entries and three new ones score high
    new_entries = [i for i in range(50) if i not in old][:3]
    scores[path].view(-1)[new_entries] = 1.0
    select_entries(model, scores, threshold=0.5)
    now = dict(zip(layer.selective_indices["default"].tolist(), layer.selective_values["default"].tolist()))
    assert sorted(now) == sorted(kept_old + new_entries)
    assert all(now[i] == old[i] for i in kept_old) and all(now[i] == 0 for i in new_entries)
    assert all(len(l.selective_indices["default"]) == 0 for p, l in selective_layers(model) if p != path)
    assert layer.selective_values["default"].requires_grad  # as the values it replaced


def test_files_of_any_size_load_back_and_damaged_indices_are_refused(tmp_path):
    model = get_peft_model(tiny_llama(), SelectiveConfig(density=0.1))
    select(model, _examples(2), density=0.05)  # global: another k per layer than the fresh model's
    _random_values(model, seed=3)
    x = model_inputs("llama")
    model.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "SELECTIVE" and "num_samples" not in config
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = f"base_model.model.{selective_layers(model)[0][0]}.selective_indices"
    assert tensors[key].dtype == torch.int32
    back = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(output_of(back, x), output_of(model, x), rtol=0, atol=0)
    assert _selected(back) == _selected(model)

    tensors[key] = tensors[key].flip(0)  # descending: not a valid index list
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    fresh = tiny_llama()
    with pytest.raises(AdapterFileError, match="ascending and distinct") as err:
        peftlab.PeftModel.from_pretrained(fresh, tmp_path)
    assert "\n" not in str(err.value)
    torch.testing.assert_close(output_of(fresh, x), output_of(tiny_llama(), x), rtol=0, atol=0)


def test_peftlab_train_scores_selects_in_rounds_and_trains(llama_dir, tmp_path, capsys):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(sentences(40)))
    out = tmp_path / "run"
    method = {"name": "selective", "density": 0.05, "num_samples": 6, "rounds": 2, "round_steps": 2}
    printed: list[str] = []
    trainer = Trainer(run_config(llama_dir, "causal_lm", str(txt), out, method), log=printed.append)
    report = json.load(open(out / SELECTION_FILE))
    assert len(report["rounds"]) == 2 and len(report["rounds"][0]["losses"]) == 2
    rows = report["rounds"][-1]["layers"]
    assert len(rows) == 14 and report["selected"] == sum(r["selected"] for r in rows)
    assert report["selected"] == round(0.05 * report["entries"])
    assert report["rounds"][-1]["min_selected_score"] > 0
    assert "Selective fine-tuning: selected entries per layer" in "\n".join(printed)
    assert all(r["layer"] in "\n".join(printed) for r in rows)
    trainable = trainer.peft_model.get_nb_trainable_parameters()[0]
    assert trainable == report["selected"]

    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    result = trainer.fit()
    assert result["after"]["loss"] < result["before"]["loss"]
    for n, p in trainer.peft_model.get_base_model().named_parameters():
        if "selective_values" not in n:
            assert torch.equal(p, before[n.replace(".base_layer", "")]), n
    assert "## Selective fine-tuning: selected entries" in open(out / "adapter" / "README.md").read()
    x = model_inputs("llama")
    back = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), out / "adapter")
    torch.testing.assert_close(output_of(back, x), output_of(trainer.peft_model.eval(), x), rtol=0, atol=0)

    # `peftlab eval` loads the file (its k per layer) without scoring again, and gets the run's final metrics.
    written = os.path.getmtime(out / SELECTION_FILE)
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"]["loss"] == pytest.approx(result["after"]["loss"], rel=1e-6)
    assert os.path.getmtime(out / SELECTION_FILE) == written


def test_resume_scores_again_and_reaches_the_same_files(llama_dir, tmp_path, monkeypatch):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(sentences(40)))
    method = {"name": "selective", "density": 0.05, "num_samples": 4}
    straight, resumed, _ = straight_and_resumed(
        lambda out: run_config(llama_dir, "causal_lm", str(txt), out, method, save_every=3), tmp_path, monkeypatch)
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("options,message", [
    ({"density": 0}, "density=0 is not valid"),
    ({"scope": "layer"}, "scope='layer' is not valid"),
    ({"rounds": 2}, "round_steps is not set"),
])
def test_config_errors_say_what_to_do(options, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        SelectiveConfig(**options)
