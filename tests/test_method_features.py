"""Features + logistic regression: pooling equals a hand computation with padding, features are cached and a second
run reads them without running the model, the probe equals scikit-learn's pipeline and separates a separable set,
saved folders reload to the same predictions, bad configs are named, and `peftlab train` with method: features
writes its folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaModel

from peftlab import FeaturesConfig, get_peft_model
from peftlab.cli.main import main
from peftlab.core.config import ConfigError
from peftlab.data import load_splits
from peftlab.methods.features import LinearProbe, extract_features, fit_probe, load
from peftlab.methods.embeddings import embed_ids, pool
from peftlab.train import build_run_config, train

from .conftest import save_tiny, sentences, tiny_llama, tiny_tokenizer, write_jsonl

LABELS = ["negative", "positive"]


# ---- pooling -------------------------------------------------------------------------------------------------------

def test_pooling_equals_a_hand_computation_with_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # right padding
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])  # left padding
    torch.testing.assert_close(pool(h, right, "mean"), torch.stack([h[0, :3].mean(0), h[1, :2].mean(0)]))
    torch.testing.assert_close(pool(h, right, "last"), torch.stack([h[0, 2], h[1, 1]]))
    torch.testing.assert_close(pool(h, right, "cls"), torch.stack([h[0, 0], h[1, 0]]))
    torch.testing.assert_close(pool(h, left, "mean"), torch.stack([h[0, 1:].mean(0), h[1, 2:].mean(0)]))
    torch.testing.assert_close(pool(h, left, "last"), torch.stack([h[0, 3], h[1, 3]]))
    torch.testing.assert_close(pool(h, left, "cls"), torch.stack([h[0, 1], h[1, 2]]))


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("layer", [None, 1])
def test_batched_features_equal_each_text_alone(pooling, layer):
    model = tiny_llama().model  # the LlamaModel inside: what AutoModel loads
    seqs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    got = embed_ids(model, seqs, pad_id=0, pooling=pooling, layer=layer, batch_size=3)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            out = model(torch.tensor([s]), output_hidden_states=True)
        h = (out.last_hidden_state if layer is None else out.hidden_states[layer])[0]
        expected = h.mean(0) if pooling == "mean" else h[-1]
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-5)


def test_layer_out_of_range_is_named():
    with pytest.raises(ConfigError, match=r"layer=7 is out of range: this model has 3 hidden-state layers"):
        embed_ids(tiny_llama().model, [[5, 6]], pad_id=0, pooling="mean", layer=7)


# ---- the cache -------------------------------------------------------------------------------------------------------

def test_features_are_cached_and_the_key_covers_pooling(tmp_path, monkeypatch):
    model, tok = tiny_llama().model, tiny_tokenizer()
    texts = sentences(6)
    config = FeaturesConfig(cache_dir=str(tmp_path), max_length=16)
    first = extract_features(model, tok, texts, config, model_path="tiny")
    assert len(os.listdir(tmp_path)) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran although the features are cached")

    monkeypatch.setattr(LlamaModel, "forward", no_forward)
    torch.testing.assert_close(extract_features(model, tok, texts, config, model_path="tiny"), first, rtol=0, atol=0)
    for changed in (FeaturesConfig(cache_dir=str(tmp_path), max_length=16, pooling="last"),
                    FeaturesConfig(cache_dir=str(tmp_path), max_length=8)):
        with pytest.raises(AssertionError, match="the model ran"):
            extract_features(model, tok, texts, changed, model_path="tiny")
    with pytest.raises(AssertionError, match="the model ran"):
        extract_features(model, tok, texts[:5], config, model_path="tiny")


# ---- the probe -------------------------------------------------------------------------------------------------------

def _blobs(n_per_class, centres, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.cat([torch.randn(n_per_class, centres.shape[1], generator=g) * 0.5 + c for c in centres])
    y = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return X, y


@pytest.mark.parametrize("classes", [2, 3])
def test_probe_separates_a_separable_set_and_equals_scikit_learn(classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    centres = torch.tensor([[4.0, 0, 0, 0], [-4.0, 0, 0, 0], [0, 4.0, 0, 0]])[:classes]
    X, y = _blobs(40, centres, seed=0)
    X_test, y_test = _blobs(20, centres, seed=1)
    names = ["a", "b", "c"][:classes]
    probe = fit_probe(X, y, names, C=0.5, class_weight="balanced")
    assert (probe.predict(X_test) == y_test).all(), "accuracy 1.0 on held-out points of separable blobs"
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, class_weight="balanced", max_iter=1000))
    reference.fit(X.double().numpy(), y.numpy())
    np.testing.assert_allclose(probe.log_probs(X_test).exp().numpy(), reference.predict_proba(X_test.double().numpy()),
                               rtol=1e-10, atol=1e-12)
    assert probe.num_params == (1 if classes == 2 else classes) * 4 + (1 if classes == 2 else classes)


def test_saved_probe_reloads_and_predicts_the_same(tmp_path):
    X, y = _blobs(30, torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), seed=2)
    probe = fit_probe(X, y, ["x", "y", "z"])
    probe.save(str(tmp_path))
    again = LinearProbe.load(str(tmp_path))
    assert again.labels == ["x", "y", "z"]
    torch.testing.assert_close(again.log_probs(X), probe.log_probs(X), rtol=0, atol=0)


def test_a_label_without_training_rows_is_refused():
    X, y = _blobs(10, torch.tensor([[1.0, 0], [0, 1.0]]), seed=0)
    with pytest.raises(ConfigError, match=r"no example of label\(s\) \['c'\]"):
        fit_probe(X, y, ["a", "b", "c"])


# ---- configs and errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    ({"pooling": "max"}, r"pooling='max' is not valid; use one of: mean, last, cls"),
    ({"C": 0}, r"C=0 is not valid"),
    ({"class_weight": "auto"}, r"class_weight='auto' is not valid"),
    ({"layer": 1.5}, r"layer=1.5 is not valid"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        FeaturesConfig(**options)


def test_unknown_pooling_in_a_run_config_names_the_method():
    with pytest.raises(ConfigError, match=r"method \(features\).*pooling='avg'"):
        build_run_config({"model": "x", "task": "classify", "data": {"train_file": "t.jsonl"},
                          "method": {"name": "features", "pooling": "avg"}})


def test_get_peft_model_refuses_and_points_to_the_run():
    with pytest.raises(ConfigError, match=r"peftlab train.*fit_features"):
        get_peft_model(tiny_llama(), FeaturesConfig())


# ---- peftlab train ---------------------------------------------------------------------------------------------------

def _config(tmp_path, model_dir, method, out="out", task="classify"):
    rows = [{"text": f"{w} {s}", "label": w} for s in sentences(24, seed=5) for w in LABELS]
    return {"model": model_dir, "task": task, "method": method,
            "data": {"train_file": write_jsonl(tmp_path / "d.jsonl", rows), "eval_fraction": 0.25, "max_length": 16},
            "train": {"output_dir": str(tmp_path / out), "progress": False, "tensorboard": False,
                      "precision": "fp32"}}


def test_peftlab_train_with_features_writes_the_folder_and_the_saved_probe_reproduces_it(llama_dir, tmp_path):
    config = _config(tmp_path, llama_dir, {"name": "features", "pooling": "mean", "cache_dir": str(tmp_path / "c")})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "adapter")) == ["README.md", "adapter_config.json", "classifier.safetensors",
                                                   "labels.json"]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(records) == 1 and records[0]["split"] == "eval" and records[0]["step"] == 0
    assert records[0]["accuracy"] >= 0.9, "the first word gives the label away: the probe finds it"
    saved = json.load(open(out / "adapter" / "adapter_config.json"))
    assert saved["peft_type"] == "FEATURES" and saved["max_length"] == 16
    assert json.load(open(out / "adapter" / "labels.json")) == LABELS
    evals = load_splits(build_run_config(config).data, "classify").eval
    clf = load(str(out / "adapter"))
    texts, gold = [r["text"] for r in evals], [r["label"] for r in evals]
    probs = clf.predict_proba(texts)
    y = torch.tensor([LABELS.index(g) for g in gold])
    assert records[0]["loss"] == pytest.approx(float(-probs[torch.arange(len(y)), y].log().mean()), abs=1e-5)
    assert records[0]["accuracy"] == pytest.approx(sum(p == g for p, g in zip(clf.predict(texts), gold)) / len(gold))


def test_a_second_run_reads_the_cached_features(llama_dir, tmp_path, monkeypatch):
    method = {"name": "features", "pooling": "last", "cache_dir": str(tmp_path / "cache")}
    first = train(build_run_config(_config(tmp_path, llama_dir, method, out="one")), log=lambda *_: None)
    assert len(os.listdir(tmp_path / "cache")) == 2  # train rows and eval rows

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran although the features are cached")

    monkeypatch.setattr(LlamaModel, "forward", no_forward)
    second = train(build_run_config(_config(tmp_path, llama_dir, method, out="two")), log=lambda *_: None)
    assert second["after"] == first["after"] and second["tokens_per_s"] == 0.0
    assert second["trainable_params"] == 32 + 1 and second["all_params"] > second["trainable_params"]


def test_cls_pooling_on_a_decoder_is_refused_with_the_reason(tmp_path):
    model_dir = save_tiny(tmp_path / "m", "llama")
    # Every text starts with the same token: a causal model's first state is then the same for all of them.
    method = {"name": "features", "pooling": "cls", "cache_dir": ""}
    config = _config(tmp_path, model_dir, method)
    rows = [{"text": f"the {w} {s}", "label": w} for s in sentences(12, seed=5) for w in LABELS]
    config["data"]["train_file"] = write_jsonl(tmp_path / "same_start.jsonl", rows)
    with pytest.raises(ConfigError, match=r"same feature vector.*first token sees only itself"):
        train(build_run_config(config), log=lambda *_: None)


def test_features_need_a_classify_task(llama_dir, tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(sentences(8)))
    run = build_run_config({"model": llama_dir, "task": "causal_lm", "method": "features",
                            "data": {"train_file": str(txt)}, "train": {"output_dir": str(tmp_path / "o")}})
    with pytest.raises(ConfigError, match="features classifies texts: it needs `task: classify`"):
        train(run, log=lambda *_: None)


@pytest.mark.parametrize("method", [{"name": "features", "pooling": "last", "cache_dir": ""},
                                    {"name": "icl", "k": 0, "instruction": ""}], ids=["features", "icl"])
def test_a_method_that_takes_over_the_run_loads_the_base_in_the_runs_model_dtype(llama_dir, tmp_path, monkeypatch,
                                                                                  method):
    """model.dtype reaches the frozen base of features and icl through the run's context (both loaded it in fp32
    whatever the run said)."""
    from peftlab.methods import baseline_run

    seen, real = [], baseline_run.load_frozen_base

    def spy(*args, **kwargs):
        tokenizer, model, path = real(*args, **kwargs)
        seen.append(next(model.parameters()).dtype)
        return tokenizer, model, path

    monkeypatch.setattr(baseline_run, "load_frozen_base", spy)
    config = _config(tmp_path, llama_dir, method)
    config["model"] = {"name": llama_dir, "dtype": "bf16"}
    config["train"]["precision"] = "bf16"
    result = train(build_run_config(config), log=lambda *_: None)
    assert seen == [torch.bfloat16]
    assert {"loss", "accuracy", "macro_f1"} <= set(result["after"])
