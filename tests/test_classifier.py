"""TextClassifier: a trained classify run as a classifier for new texts, checked against HF PEFT reading the same
files and scoring one text at a time (no padding), and the label names the run folder now records."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from peftlab.core.config import ConfigError
from peftlab.train import TextClassifier, train

from .conftest import run_config, save_tiny, sentences, tiny_tokenizer, write_jsonl

quiet = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    """A tiny Llama taught that a text starting with 'great' is label 'good' and with 'awful' is 'bad'."""
    root = tmp_path_factory.mktemp("clf")
    model_dir = save_tiny(root / "llama", "llama")
    rows = [{"text": f"{w} {s}", "label": label} for s in sentences(48, seed=5)
            for w, label in (("great", "good"), ("awful", "bad"))]
    out = root / "run"
    method = {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    result = train(run_config(model_dir, "classify", write_jsonl(root / "d.jsonl", rows), out, method=method,
                              max_steps=30), log=quiet)
    assert result["after"]["accuracy"] > 0.9
    return model_dir, str(out)


def test_the_run_folder_records_its_label_set(classify_run):
    _, out = classify_run
    with open(os.path.join(out, "run_config.yaml")) as fh:
        saved = yaml.safe_load(fh)
    assert saved["data"]["labels"] == ["bad", "good"]  # sorted: the class ids training used


def _peft_probabilities(model_dir, adapter, texts):
    """HF PEFT on our files, each text alone (no padding), softmax of the head: the independent reference."""
    import peft
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    tok = tiny_tokenizer()
    with torch.no_grad():
        return torch.cat([torch.softmax(model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits, -1)
                          for t in texts])


def test_probabilities_equal_hf_peft_on_the_same_files_in_the_order_given(classify_run):
    model_dir, out = classify_run
    clf = TextClassifier.from_run(out)
    assert clf.labels == ["bad", "good"]
    # Different lengths, so batching by length reorders them internally; the result keeps the order given.
    texts = ["great the movie was fun and the story", "awful plot", "great", "awful the acting was bad and long"]
    ours = clf.predict_proba(texts, batch_size=3)
    torch.testing.assert_close(ours, _peft_probabilities(model_dir, os.path.join(out, "adapter"), texts),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.sum(-1), torch.ones(len(texts)))
    assert clf.predict(texts) == [clf.labels[i] for i in ours.argmax(-1).tolist()]
    # New texts drawn as the training rows were: the run learned the rule, and predict names its labels.
    fresh = [(f"{w} {s}", label) for s in sentences(20, seed=11) for w, label in (("great", "good"), ("awful", "bad"))]
    predicted = clf.predict([t for t, _ in fresh])
    assert sum(p == label for p, (_, label) in zip(predicted, fresh)) >= 0.8 * len(fresh)


def test_a_run_saved_without_its_labels_derives_them_from_its_data(classify_run, tmp_path):
    _, out = classify_run
    old = tmp_path / "old_run"
    old.mkdir()
    os.symlink(os.path.join(out, "adapter"), old / "adapter")
    with open(os.path.join(out, "run_config.yaml")) as fh:
        saved = yaml.safe_load(fh)
    saved["data"]["labels"] = None
    (old / "run_config.yaml").write_text(yaml.safe_dump(saved))
    assert TextClassifier.from_run(str(old)).labels == ["bad", "good"]


def test_bad_inputs_are_refused_with_what_to_do(classify_run, tmp_path, llama_dir):
    _, out = classify_run
    with pytest.raises(ConfigError, match="no run_config.yaml"):
        TextClassifier.from_run(str(tmp_path))
    with pytest.raises(ConfigError, match="no adapter"):
        TextClassifier.from_run(out, adapter_dir=str(tmp_path))
    clf = TextClassifier.from_run(out)
    with pytest.raises(ValueError, match="one string"):
        clf.predict_proba("great fun")
    with pytest.raises(ValueError, match=r"texts \[1\] are empty"):
        clf.predict_proba(["great fun", "  "])
    lm = tmp_path / "lm"
    (tmp_path / "c.txt").write_text("\n\n".join(sentences(12)))
    train(run_config(llama_dir, "causal_lm", str(tmp_path / "c.txt"), lm, max_steps=1), log=quiet)
    with pytest.raises(ConfigError, match="'causal_lm' run; this needs a run with task: classify"):
        TextClassifier.from_run(str(lm))
