"""`peftlab compare` runs that need workers: the seeds loop (2 seeds x 2 tiny methods, resumable per (method, seed))
and the generation metrics of an sft comparison (greedy continuations scored by ROUGE-L and exact match)."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import yaml

from peftlab.cli.main import main
from peftlab.compare.report import read_metrics

from .conftest import save_tiny
from .conftest import sentences as _sentences
from .conftest import write_jsonl as _write_jsonl

TRAIN = {"lr": 1e-2, "batch_size": 4, "max_steps": 4, "log_every": 1, "progress": False, "tensorboard": False,
         "precision": "fp32"}


def _csv(out):
    with open(out / "report" / "results.csv", encoding="utf-8") as fh:
        return {r["method"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """lora and head_only with 2 seeds each: 4 worker processes."""
    root = tmp_path_factory.mktemp("seeds")
    rows = [{"text": f"{w} {s}", "label": w} for s in _sentences(16, seed=3) for w in ["positive", "negative"]]
    config = {"model": save_tiny(root / "llama", "llama"), "task": "classify",
              "data": {"train_file": _write_jsonl(root / "d.jsonl", rows), "eval_fraction": 0.25, "max_length": 32},
              "train": {"output_dir": str(root / "cmp"), **TRAIN},
              "methods": [{"name": "lora", "method": {"name": "lora", "r": 4, "target_modules": ["q_proj"]}},
                          "head_only"]}
    path = root / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, root / "cmp", main(["compare", str(path), "--seeds", "2"])


def test_each_method_runs_once_per_seed_and_the_table_summarises_them(seeded):
    _, out, code = seeded
    assert code == 0
    for label in ("lora", "head_only"):
        first = json.loads((out / "runs" / label / "result.json").read_text())
        second = json.loads((out / "seed1" / "runs" / label / "result.json").read_text())
        assert first["status"] == second["status"] == "ok"
        assert yaml.safe_load((out / "seed1" / "runs" / label / "config.yaml").read_text())["train"]["seed"] == 1
        assert (out / "seed1" / "logs" / f"{label}.log").is_file()
        # The seed reaches training (new weights, data order), not the eval rows.
        losses = [[r["loss"] for r in read_metrics(folder) if r["split"] == "train"]
                  for folder in (out / "runs" / label, out / "seed1" / "runs" / label)]
        assert len(losses[0]) == 4 and losses[0] != losses[1]
        assert first["data"]["label_counts"]["eval"] == second["data"]["label_counts"]["eval"]

        row = _csv(out)[label]
        per_seed = [float(v) for v in row["accuracy_per_seed"].split(";")]
        assert per_seed == [first["after"]["accuracy"], second["after"]["accuracy"]]
        assert row["seeds"] == "0;1" and row["seeds_ok"] == "2"
        assert float(row["accuracy"]) == pytest.approx(sum(per_seed) / 2)
        assert float(row["accuracy_sd"]) == pytest.approx(statistics.stdev(per_seed))
        assert float(row["accuracy_low"]) <= float(row["accuracy"]) <= float(row["accuracy_high"])
    md = (out / "report" / "results.md").read_text()
    assert "accuracy (mean of 2 seeds, higher is better) [95% Wilson interval]" in md and "sd over seeds" in md


def test_seeds_are_resumable_one_by_one(seeded, capsys):
    path, _, _ = seeded
    capsys.readouterr()
    assert main(["compare", str(path), "--seeds", "3", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    # Seeds 0 and 1 of both methods are reused; only seed 2 would run.
    assert printed.count("reuse stored result (ok)") == 4 and printed.count("seed 2: run (no result yet)") == 2
    assert main(["compare", str(path), "--seeds", "0", "--dry-run"]) == 1
    assert "seeds must be a whole number >= 1, not 0" in capsys.readouterr().err


def test_sft_comparison_scores_greedy_generations_with_rouge_l(tmp_path):
    from rouge_score import rouge_scorer

    words = _sentences(24, seed=7)
    rows = [{"prompt": s, "response": "yes please"} for s in words]
    config = {"model": save_tiny(tmp_path / "llama", "llama"), "task": "sft", "generate_max_tokens": 6,
              "data": {"train_file": _write_jsonl(tmp_path / "d.jsonl", rows), "eval_fraction": 0.25,
                       "max_length": 48},
              "train": {"output_dir": str(tmp_path / "cmp"), **TRAIN, "lr": 5e-2},
              "methods": [{"name": "lora", "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}}]}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", str(path)]) == 0
    out = tmp_path / "cmp"
    result = json.loads((out / "runs" / "lora" / "result.json").read_text())
    gen = result["generation"]
    assert gen["max_new_tokens"] == 6 and gen["rows"] == result["data"]["counts"]["eval"] == 6
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for stage in ("after", "base"):
        rec = gen[stage]
        assert len(rec["rougeL"]) == len(rec["exact_match"]) == len(rec["tokens"]) == 6
        for i, ex in enumerate(rec["examples"]):  # the stored score is rouge-score's on the stored texts
            assert ex["reference"] == "yes please"
            assert rec["rougeL"][i] == pytest.approx(scorer.score(ex["reference"], ex["prediction"])["rougeL"].fmeasure)
            assert rec["exact_match"][i] == float(ex["prediction"] == ex["reference"])
    # Per-row teacher-forced losses add up to the loop's own eval loss (rows unpacked, same loss function).
    after = gen["after"]
    assert sum(after["loss_sum"]) / sum(after["tokens"]) == pytest.approx(result["after"]["loss"], rel=1e-5)
    assert sum(gen["base"]["loss_sum"]) / sum(gen["base"]["tokens"]) == pytest.approx(result["before"]["loss"],
                                                                                      rel=1e-5)

    table = _csv(out)
    row, base = table["lora"], table["base model, no training (adapters off)"]
    assert float(row["rougeL"]) == pytest.approx(sum(after["rougeL"]) / 6)
    assert float(base["rougeL"]) == pytest.approx(sum(gen["base"]["rougeL"]) / 6)
    assert float(row["rougeL_low"]) <= float(row["rougeL"]) <= float(row["rougeL_high"])
    assert float(row["eval_loss_low"]) < float(row["eval_loss"]) < float(row["eval_loss_high"])
    md = (out / "report" / "results.md").read_text()
    for header in ("eval loss (lower is better) [95% bootstrap interval]", "perplexity",
                   "exact match (higher is better) [95% Wilson interval]",
                   "ROUGE-L (higher is better) [95% bootstrap interval]"):
        assert header in md, header
