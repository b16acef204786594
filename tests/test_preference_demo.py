"""benchmarks/preference_demo.py end to end on tiny runs: policies answer, the classifier and reward model judge,
and the reported figures are the judges' own numbers on the answers."""

from __future__ import annotations

import importlib.util
import json
import os

from peftlab.train import TextClassifier, train
from peftlab.train.preference import RewardModel

from .conftest import run_config, save_tiny, sentences, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda *_: None  # noqa: E731


def _demo():
    spec = importlib.util.spec_from_file_location("preference_demo", os.path.join(REPO, "benchmarks",
                                                                                   "preference_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_judges_every_policy_with_the_classifier_and_reward_model(tmp_path):
    model_dir = save_tiny(tmp_path / "llama", "llama")
    lora = {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    texts = sentences(24, seed=2)
    clf_rows = [{"text": f"{w} {s}", "label": label} for s in texts for w, label in (("great", "good"),
                                                                                      ("awful", "bad"))]
    train(run_config(model_dir, "classify", write_jsonl(tmp_path / "c.jsonl", clf_rows), tmp_path / "clf",
                     method=lora, max_steps=4), log=quiet)
    pairs = [{"prompt": "write a review", "chosen": "great " + s, "rejected": "awful " + s} for s in texts]
    train(run_config(model_dir, "reward", write_jsonl(tmp_path / "p.jsonl", pairs), tmp_path / "rm", method=lora,
                     max_steps=4), log=quiet)
    (tmp_path / "lm.txt").write_text("\n\n".join("great " + s for s in texts))
    train(run_config(model_dir, "causal_lm", str(tmp_path / "lm.txt"), tmp_path / "pol", method=lora, max_steps=4),
          log=quiet)

    out = tmp_path / "demo"
    assert _demo().main(["--policy", f"tuned={tmp_path / 'pol'}", "--classifier", str(tmp_path / "clf"),
                         "--positive-label", "good", "--reward", str(tmp_path / "rm"), "--n", "5", "--show", "5",
                         "--max-new-tokens", "6", "--batch", "2", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["model"] == model_dir  # taken from the policy run's config
    rows = {r["policy"]: r for r in result["rows"]}
    assert list(rows) == ["base", "tuned"]
    clf = TextClassifier.from_run(str(tmp_path / "clf"))
    rm = RewardModel.from_run(str(tmp_path / "rm"))
    for row in rows.values():
        answers = row["examples"]
        assert row["n"] == len(answers) == 5
        p_good = clf.predict_proba(answers)[:, clf.labels.index("good")]
        assert abs(row["mean_p_positive"] - float(p_good.mean())) < 1e-5
        assert row["positive_fraction"] == float((p_good > 0.5).float().mean())
        prompts = ["Write a positive movie review:"] * 5
        assert abs(row["mean_reward"] - float(rm.score(prompts, answers).mean())) < 1e-5
    assert (out / "results.md").read_text().startswith("| policy | n | judged positive")
