"""`peftlab compare` on a tiny Llama: every method in its own worker, a failing one kept in the table, the table and
plots written, stored results reused, and a bad config refused before anything runs."""

from __future__ import annotations

import csv
import json
import os

import pytest
import yaml

from peftlab.cli.main import main
from peftlab.compare import build_compare_config, default_compare_config_path
from peftlab.compare.report import read_metrics
from peftlab.compare.runner import died
from peftlab.core.config import ConfigError
from peftlab.core.method import registered_methods

from .conftest import save_tiny
from .conftest import sentences as _sentences
from .conftest import write_jsonl as _write_jsonl

# LoRA r=4 on q_proj (32 -> 32) and v_proj (32 -> 16: 2 kv heads x 8) of the tiny Llama's 2 layers, plus the new
# 2-class head (32 x 2, no bias): 2 x (4 x (32 + 32) + 4 x (32 + 16)) + 64.
LORA_TRAINABLE = 2 * (4 * (32 + 32) + 4 * (32 + 16)) + 64


def _config(root, model_dir, methods, **train):
    rows = [{"text": f"{w} {s}", "label": w} for s in _sentences(24, seed=5) for w in ["positive", "negative"]]
    return {"model": model_dir, "task": "classify",
            "data": {"train_file": _write_jsonl(root / "d.jsonl", rows), "eval_fraction": 0.25, "max_length": 32},
            "train": {"output_dir": str(root / "cmp"), "lr": 1e-2, "batch_size": 4, "max_steps": 6, "log_every": 1,
                      "progress": False, "tensorboard": False, "precision": "fp32", **train},
            "methods": methods}


METHODS = [
    {"name": "lora", "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}},
    {"name": "vera", "method": {"name": "vera", "r": 8, "target_modules": ["q_proj", "v_proj"]},
     "train": {"lr": 5e-2}},
    # Valid as a config; fails in its worker when the targets meet the model.
    {"name": "broken", "method": {"name": "lora", "target_modules": ["no_such_module"]}},
]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Two compare runs over the same config: `--only lora,broken` first, then all methods (only vera is left to
    run). Three worker processes in all (~5 s each: torch and transformers are imported in each)."""
    root = tmp_path_factory.mktemp("compare")
    model_dir = save_tiny(root / "llama", "llama")
    path = root / "compare.yaml"
    path.write_text(yaml.safe_dump(_config(root, model_dir, METHODS)))
    out = root / "cmp"
    first = {"code": main(["compare", str(path), "--only", "lora,broken"]), "rows": None, "mtimes": None}
    first["rows"] = _csv(out)
    first["mtimes"] = {m: (out / "runs" / m / "result.json").stat().st_mtime_ns for m in ("lora", "broken")}
    code = main(["compare", str(path)])
    return path, out, code, first


def _csv(out):
    with open(out / "report" / "results.csv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_compare_writes_table_and_plots_and_keeps_the_failed_method(compared):
    _, out, code, _ = compared
    assert code == 1, "one method failed: the exit status says so, the table is still written"
    for name in ("results.md", "results.csv", "score_vs_params.png", "loss_curves.png", "score_vs_cost.png",
                 "compare_config.yaml"):
        assert (out / "report" / name).is_file(), name
    for name in ("score_vs_params.png", "loss_curves.png", "score_vs_cost.png"):
        data = (out / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name

    all_rows = _csv(out)
    references, rows = all_rows[:2], all_rows[2:]
    # 12 eval rows (0.25 of 48); the majority level is the most common eval label's share, from the data counts.
    counts = json.loads((out / "runs" / "lora" / "result.json").read_text())["data"]["label_counts"]["eval"]
    top = max(counts, key=counts.get)
    assert sum(counts.values()) == 12 and counts[top] > 6
    assert [r["method"] for r in references] == ["chance (1/2)", f"majority class ({top}: {counts[top]} of 12)"]
    assert [float(r["accuracy"]) for r in references] == [0.5, counts[top] / 12] and references[0]["accuracy_low"] == ""
    assert [r["method"] for r in rows] == ["lora", "vera", "broken"]
    assert list(rows[0])[:5] == ["method", "method_name", "seeds_ok", "seeds", "accuracy"], "the score says what it is"
    numeric = ["accuracy", "accuracy_low", "accuracy_high", "eval_loss", "trainable_params", "trainable_pct",
               "peak_mem_mib", "wall_s", "train_s", "tokens_per_s", "adapter_bytes"]
    for r in rows[:2]:
        assert r["status"] == "ok", r
        values = {k: float(r[k]) for k in numeric}
        assert 0 <= values["accuracy_low"] < values["accuracy"] < values["accuracy_high"] <= 1
        assert values["eval_loss"] > 0 and r["accuracy_sd"] == "" and r["seeds"] == "0"
        assert 0 < values["trainable_pct"] < 100 and values["peak_mem_mib"] > 10 and values["tokens_per_s"] > 0
        assert values["wall_s"] >= values["train_s"] > 0
    assert float(rows[0]["trainable_params"]) == LORA_TRAINABLE
    assert float(rows[1]["trainable_params"]) < LORA_TRAINABLE, "VeRA trains vectors only"
    broken = rows[2]
    assert broken["method_name"] == "lora" and "no_such_module" in broken["status"], broken["status"]
    assert all(broken[k] == "" for k in numeric), "a failed method has empty number cells"

    lines = (out / "report" / "results.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 2 + 3, "header, separator, the two reference rows, one row per method"
    assert len({line.count(" | ") for line in table if not line.startswith("|---")}) == 1, "same cells per row"
    assert "accuracy (higher is better) [95% Wilson interval]" in table[0] and "peak RSS (MiB)" in table[0]
    low, high = float(rows[0]["accuracy_low"]), float(rows[0]["accuracy_high"])
    assert f"{float(rows[0]['accuracy']):.4f} [{low:.4f}, {high:.4f}]" in table[4], "value [interval] in the cell"


def test_each_method_keeps_its_run_folder_result_and_log(compared):
    _, out, _, _ = compared
    lora = json.loads((out / "runs" / "lora" / "result.json").read_text())
    adapter = out / "runs" / "lora" / "adapter"
    assert lora["adapter_bytes"] == sum(f.stat().st_size for f in adapter.iterdir())
    assert lora["all_params"] > lora["trainable_params"] == LORA_TRAINABLE
    train_steps = [r["step"] for r in read_metrics(out / "runs" / "lora") if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6], "the loss curve has every logged step, once"
    # The worker's own config reproduces the run with `peftlab train`; the log has what the worker printed.
    assert yaml.safe_load((out / "runs" / "lora" / "config.yaml").read_text())["method"]["r"] == 4
    assert "compare worker: lora: ok" in (out / "logs" / "lora.log").read_text()
    assert "Traceback" in (out / "logs" / "broken.log").read_text(), "a failure's traceback is in its log"


def test_only_runs_a_subset_and_a_second_run_reuses_stored_results(compared, capsys):
    path, out, _, first = compared
    assert first["code"] == 1
    methods = [r for r in first["rows"] if r["method_name"] != "reference"]
    assert [(r["method"], r["status"]) for r in methods][1] == ("vera", "not run"), "listed, not run"
    assert methods[0]["status"] == "ok"
    # The second (full) run ran only vera: lora's and broken's results are the files the first run wrote.
    assert {m: (out / "runs" / m / "result.json").stat().st_mtime_ns for m in ("lora", "broken")} == first["mtimes"]

    capsys.readouterr()
    assert main(["compare", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[reuse stored result (ok)]") == 2 and printed.count("[reuse stored result (error)]") == 1
    assert main(["compare", str(path), "--dry-run", "--rerun", "--only", "vera,broken"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[run (--rerun)]") == 2 and "lora: lora r=4" in printed and "[not selected]" in printed
    # Changed shared settings are not served from the stored results.
    assert main(["compare", str(path), "train.max_steps=5", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("[run (settings changed since the stored result)]") == 3


def test_bad_config_is_refused_before_any_method_runs(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "llama", "llama")
    methods = [METHODS[0], {"name": "typo", "method": "lorra"},
               {"name": "bad_key", "method": {"name": "lora", "rank": 8}},
               {"name": "bad_train", "method": "vera", "train": {"lr_rate": 1.0}}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, model_dir, methods)))
    assert main(["compare", str(path)]) == 1
    err = capsys.readouterr().err
    assert "3 problems" in err and "nothing was run" in err and "Traceback" not in err
    assert "methods[1] (typo)" in err and "No method named 'lorra'" in err and "Did you mean lora" in err
    assert "methods[2] (bad_key)" in err and "unknown key 'rank'" in err
    assert "methods[3] (bad_train)" in err and "unknown key 'lr_rate'" in err and "Did you mean lr" in err
    assert not (tmp_path / "cmp").exists(), "nothing ran, nothing was written"

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_config(tmp_path, model_dir, [METHODS[0]])))
    assert main(["compare", str(good), "--only", "lorra"]) == 1
    assert "did you mean lora" in capsys.readouterr().err
    assert main(["compare", str(good), "data.max_lenght=8"]) == 1
    assert "unknown key 'max_lenght'" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_config_entries_forms_and_label_rules(tmp_path):
    base = _config(tmp_path, "unused-model", [])
    cfg = build_compare_config({**base, "methods": ["vera", {"name": "l8", "method": {"method": "lora", "r": 8}},
                                                     {"name": "full", "method": "full", "train": {"lr": 1e-5}}]})
    assert [(e.label, e.method_name) for e in cfg.entries] == [("vera", "vera"), ("l8", "lora"), ("full", "full")]
    assert cfg.entries[1].run.method.r == 8
    assert cfg.entries[2].run.train.lr == 1e-5 and cfg.entries[0].run.train.lr == 1e-2, "overrides stay per method"
    assert cfg.entries[0].run.train.output_dir == os.path.join(str(tmp_path / "cmp"), "runs", "vera")
    assert cfg.entries[0].fingerprint() != cfg.entries[1].fingerprint()
    for methods, message in [(["lora", "lora"], "already used"), ([{"name": "a b", "method": "lora"}], "label"),
                             ([], "non-empty list"), ([{"name": "x", "method": "lora", "train": {"output_dir": "y"}}],
                                                      "set by compare")]:
        with pytest.raises(ConfigError, match=message):
            build_compare_config({**base, "methods": methods})
    with pytest.raises(ConfigError, match="under `methods:`"):
        build_compare_config({**base, "method": "lora", "methods": ["lora"]})


def test_shipped_default_comparison_is_valid_for_every_registered_method():
    """compare_default.yaml lists methods other helpers add over time; every one registered here must build."""
    with open(default_compare_config_path(), encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    registered = {m.name for m in registered_methods()}

    def name(entry):
        method = entry if isinstance(entry, str) else entry["method"]
        return method if isinstance(method, str) else method["name"]

    present = [e for e in raw["methods"] if name(e) in registered]
    assert {"lora", "dora", "vera"} <= {name(e) for e in present}
    cfg = build_compare_config({**raw, "methods": present}, "compare_default.yaml")
    assert cfg.base["model"] == "smollm2" and cfg.task == "classify" and cfg.output_dir == "out/compare"
    assert len(raw["methods"]) == 11


def test_a_killed_worker_is_reported_with_its_signal(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("loading\rstep 3/10\r\n")
    assert "SIGKILL" in died(-9, str(log)) and "out of memory" in died(-9, str(log))
    assert died(2, str(log)).endswith("status 2 without a result; last log line: step 3/10")
