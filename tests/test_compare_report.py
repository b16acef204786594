"""The comparison's numbers and pictures without running any method: Wilson and bootstrap intervals against
independent formulas, the seed summary, the reference rows, and the three plots' elements (read from the matplotlib
figures, not from pixels). Results are written as a worker would write them."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest

from peftlab.compare import build_compare_config
from peftlab.compare.plots import plot_cost, plot_loss_curves, plot_score_vs_params, smooth, style
from peftlab.compare.report import ACCURACY, baseline_rows, group_results, markdown_table
from peftlab.compare.runner import collect_results, result_path, run_dir, write_outputs
from peftlab.compare.stats import bootstrap_interval, fraction_interval, seed_spread, wilson_interval

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_closed_form(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927): (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), written out here."""
    p, z2 = k / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (120, 160), (117, 160), (1, 3)])
def test_wilson_interval_matches_the_closed_form(k, n):
    low, high = wilson_interval(k, n)
    ref = wilson_closed_form(k, n)
    assert low == pytest.approx(max(ref[0], 0.0), abs=1e-12) and high == pytest.approx(min(ref[1], 1.0), abs=1e-12)


def test_wilson_known_values_and_fractions():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)  # not empty at 0 successes
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # 0.75 of 160 rows: 120 right; about +-6.7 points (the docs' "one standard error ~3.4" doubled, skewed).
    low, high = fraction_interval(0.75, 160)
    assert (low, high) == pytest.approx(wilson_closed_form(120, 160), abs=1e-12)
    assert high - low == pytest.approx(0.1331, abs=1e-3)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(11, 10)


def test_bootstrap_interval_of_a_mean_and_of_a_ratio():
    rng = np.random.default_rng(1)
    x = rng.normal(0.4, 0.2, size=400)
    low, high = bootstrap_interval(x)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert low < x.mean() < high
    assert low == pytest.approx(x.mean() - Z95 * se, abs=0.15 * Z95 * se)  # the normal interval, at n = 400
    assert high == pytest.approx(x.mean() + Z95 * se, abs=0.15 * Z95 * se)
    assert bootstrap_interval([0.3] * 20) == pytest.approx((0.3, 0.3), abs=1e-15), "no spread, no interval"

    # A token-weighted mean loss: rows resampled as (loss sum, tokens) pairs. Reference: a percentile bootstrap
    # written out with numpy (BCa differs from it by a skew correction that is small here).
    tokens = rng.integers(5, 40, size=300).astype(float)
    sums = tokens * rng.normal(2.0, 0.5, size=300)
    low, high = bootstrap_interval(sums, tokens)
    idx = np.random.default_rng(2).integers(0, 300, size=(20_000, 300))
    ratios = sums[idx].sum(1) / tokens[idx].sum(1)
    ref_low, ref_high = np.percentile(ratios, [2.5, 97.5])
    assert low < sums.sum() / tokens.sum() < high
    assert low == pytest.approx(ref_low, abs=0.01) and high == pytest.approx(ref_high, abs=0.01)


def test_seed_spread_and_smoothing():
    assert seed_spread([0.7]) is None
    assert seed_spread([0.7, 0.75, 0.8]) == pytest.approx(0.05)  # sample sd (n - 1)
    assert smooth([2.0]) == [2.0], "debiased: the first point is itself"
    w = 0.6
    s1 = (1 - w) * 1.0 / (1 - w)
    s2 = (w * (1 - w) * 1.0 + (1 - w) * 3.0) / (1 - w ** 2)
    assert smooth([1.0, 3.0], w) == pytest.approx([s1, s2])


# ---- a synthetic comparison: results as the worker writes them ---------------------------------------------------

METHODS = ["icl", "head_only", "lora", "dora"]
# accuracy (rows right of 160), trainable params, final loss; lora and dora on one spot
SCORES = {"icl": (88 / 160, 0, 0), "head_only": (103 / 160, 1_152, 0.61), "lora": (117 / 160, 615_552, 0.55),
          "dora": (117 / 160, 630_912, 0.55)}


def _compare(tmp_path, seeds: int):
    raw = {"model": "unused-model", "task": "classify", "seeds": seeds,
           "data": {"train_file": "unused.jsonl", "max_eval_rows": 160},
           "train": {"output_dir": str(tmp_path / "cmp"), "batch_size": 16, "log_every": 4},
           "methods": METHODS}
    config = build_compare_config(raw)
    for item in config.seed_runs(config.entries):
        acc, params, loss = SCORES[item.label]
        acc += 0.0125 * item.index  # seed k: 2 more rows right
        os.makedirs(run_dir(item))
        trains = item.label != "icl"
        result = {"label": item.label, "method": item.label, "status": "ok", "fingerprint": item.fingerprint(),
                  "before": {"accuracy": 0.55 if item.label == "icl" else 0.5, "loss": 0.9},
                  "after": {"accuracy": acc, "loss": loss or 1.1}, "steps": 32 if trains else 0,
                  "trainable_params": params, "all_params": 134_515_008 + params, "peak_rss_bytes": 1500 * 2**20,
                  "wall_seconds": 80.0 + params / 1e5, "train_seconds": 40.0, "tokens_per_s": 300.0,
                  "data": {"counts": {"train": 512, "eval": 160}, "labels": ["negative", "positive"],
                           "label_counts": {"eval": {"negative": 86, "positive": 74}}}}
        with open(result_path(item), "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        if trains:
            with open(os.path.join(run_dir(item), "metrics.jsonl"), "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": 0, "split": "eval", "loss": 0.9}) + "\n")
                r = random.Random(item.label)
                for step in range(4, 33, 4):
                    fh.write(json.dumps({"step": step, "split": "train", "loss": loss + r.random() / 5}) + "\n")
                fh.write(json.dumps({"step": 32, "split": "eval", "loss": loss}) + "\n")
    return config


def test_reference_rows_and_seed_summary(tmp_path):
    config = _compare(tmp_path, seeds=2)
    results = collect_results(config)
    assert [(r["label"], r["seed"]) for r in results][:3] == [("icl", 0), ("icl", 1), ("head_only", 0)]
    assert results[1]["run_dir"] == os.path.join(config.output_dir, "seed1", "runs", "icl")
    refs = baseline_rows(results, "classify")
    assert [r.label for r in refs] == ["chance (1/2)", "majority class (negative: 86 of 160)",
                                       "base model, no training (zero-shot prompt)"]
    assert [r.cells["accuracy"].value for r in refs] == pytest.approx([0.5, 86 / 160, 0.55])
    rows = group_results(results, "classify")
    lora = next(r for r in rows if r.label == "lora").cells["accuracy"]
    assert lora.per_seed == pytest.approx([117 / 160, 119 / 160]) and lora.value == pytest.approx(118 / 160)
    assert lora.sd == pytest.approx(0.0125 / math.sqrt(2))
    assert (lora.low, lora.high) == pytest.approx(wilson_closed_form(118, 160))
    text = markdown_table(refs + rows, results, "classify", 2)
    assert "accuracy (mean of 2 seeds, higher is better) [95% Wilson interval]" in text
    assert "accuracy sd over seeds" in text


def test_plots_have_interval_bars_reference_lines_and_distinct_styles(tmp_path):
    config = _compare(tmp_path, seeds=1)
    results = collect_results(config)
    rows, refs = group_results(results, "classify"), baseline_rows(results, "classify")
    out = tmp_path / "png"
    out.mkdir()

    fig = plot_score_vs_params(str(out / "s.png"), rows, refs, results, "classify", "t")
    ax = fig.axes[0]
    bars = [c for c in ax.containers if c.has_yerr]
    assert len(bars) == len(METHODS), "one point with an interval bar per method"
    lines = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert lines["chance (1/2): 0.500"] == 0.5 and any(k.startswith("majority class") for k in lines)
    low, high = ax.get_ylim()
    assert 0.4 <= low <= 0.5 < 0.73 < high <= 1.0, "the y axis starts at chance (and the lowest bar), not at 0.7"
    assert ax.get_xscale() == "log"
    names = {t.get_text(): t.xyann for t in ax.texts}
    assert {"lora", "dora"} <= set(names) and names["lora"] != names["dora"], "names on one spot are moved apart"
    assert "Wilson interval over the 160 eval rows" in ax.get_title()

    fig = plot_loss_curves(str(out / "l.png"), rows, "t")
    ax = fig.axes[0]
    smoothed = [line for line in ax.get_lines() if line.get_label() in METHODS]
    assert len(smoothed) == 3, "the three trained methods (icl logs no train loss)"
    assert len({(line.get_linestyle(), line.get_marker(), line.get_color()) for line in smoothed}) == 3
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks()), "whole optimizer steps"
    assert "EMA" in ax.get_title()

    fig = plot_cost(str(out / "c.png"), rows, refs, results, "classify", "t", "RSS")
    assert len(fig.axes) == 2 and all(len(a.containers) == len(METHODS) for a in fig.axes)
    assert "wall time" in fig.axes[0].get_xlabel() and "peak RSS" in fig.axes[1].get_xlabel()

    import matplotlib.image

    assert matplotlib.image.imread(str(out / "s.png")).shape[:2] == (660, 1200)  # 10 x 5.5 in at 120 dpi
    assert matplotlib.image.imread(str(out / "c.png")).shape[:2] == (600, 1440)
    assert style(0) != style(10) and style(0)["color"] != style(10)["color"], "11 methods, 11 colours"


def test_report_folder_from_stored_results(tmp_path):
    config = _compare(tmp_path, seeds=1)
    files, table = write_outputs(config, collect_results(config))
    assert sorted(os.path.basename(p) for p in files.values()) == sorted(
        ["results.md", "results.csv", "score_vs_params.png", "loss_curves.png", "score_vs_cost.png",
         "compare_config.yaml"])
    assert all(os.path.isfile(p) for p in files.values())
    assert "| lora | lora | 0.7312 [0.6577, 0.7939] |" in table
    assert ACCURACY.interval == "Wilson"


def test_stored_results_survive_new_options_with_their_default(tmp_path):
    """A result stored before peftlab gained an option (its fingerprint lacks it) is still reused while that option
    is at its default; a changed value, or a new option set away from its default, reruns the method."""
    config = _compare(tmp_path, seeds=1)
    item = config.seed_runs(config.entries)[2]
    stored = json.loads(item.fingerprint())
    del stored["train"]["warmup_steps"]  # as if stored before train.warmup_steps existed (default 0)
    assert item.made_with_these_settings(json.dumps(stored))
    assert not item.made_with_these_settings(json.dumps({**stored, "train": {**stored["train"], "lr": 0.5}}))
    raw = {"model": "unused-model", "task": "classify", "data": {"train_file": "unused.jsonl", "max_eval_rows": 160},
           "train": {"output_dir": str(tmp_path / "cmp"), "batch_size": 16, "log_every": 4, "warmup_steps": 3},
           "methods": METHODS}
    changed = build_compare_config(raw).seed_runs(build_compare_config(raw).entries)[2]
    assert not changed.made_with_these_settings(json.dumps(stored)), "the new option is set: not the stored settings"
    assert not item.made_with_these_settings(None)
