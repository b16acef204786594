"""The comparison's outputs: results.md, results.csv, score_vs_params.png and loss_curves.png.

Every number comes from a method's result JSON (written by the worker) or its run folder's metrics.jsonl; a method
that failed keeps its row, with its error as status and its number columns empty.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Score:
    key: str
    """The metric in `after` (accuracy or loss)."""
    title: str
    """Its name in the table header and on the plot's y axis."""
    higher_is_better: bool


ACCURACY = Score("accuracy", "accuracy", True)
EVAL_LOSS = Score("loss", "eval loss", False)


def pick_score(task: str, results: list[dict]) -> Score:
    """Accuracy where every successful run reports it (classify), else the eval loss (language modelling: the
    table then also shows perplexity)."""
    ok = [r for r in results if r.get("status") == "ok" and r.get("after")]
    if ok:
        return ACCURACY if all("accuracy" in r["after"] for r in ok) else EVAL_LOSS
    return ACCURACY if task == "classify" else EVAL_LOSS


# (CSV column, markdown header, value from a result, markdown format). Number columns are empty unless status is ok.
def _columns(score: Score, memory_kind: str) -> list[tuple[str, str, object, str]]:
    arrow = "higher is better" if score.higher_is_better else "lower is better"
    cols = [
        (score.key if score is ACCURACY else "eval_loss", f"{score.title} ({arrow})",
         lambda r: r["after"].get(score.key), "{:.4f}"),
    ]
    if score is ACCURACY:
        cols.append(("eval_loss", "eval loss", lambda r: r["after"].get("loss"), "{:.4f}"))
    else:
        cols.append(("perplexity", "perplexity", lambda r: r["after"].get("perplexity"), "{:.2f}"))
    cols += [
        ("trainable_params", "trainable params", lambda r: r.get("trainable_params"), "{:,.0f}"),
        ("trainable_pct", "% of all", lambda r: _pct(r), "{:.4f}"),
        ("peak_mem_mib", f"peak {memory_kind} (MiB)", lambda r: _memory(r, memory_kind), "{:.0f}"),
        ("wall_s", "wall time (s)", lambda r: r.get("wall_seconds"), "{:.0f}"),
        ("train_s", "train time (s)", lambda r: r.get("train_seconds"), "{:.0f}"),
        ("tokens_per_s", "tokens/s", lambda r: r.get("tokens_per_s") if r.get("steps") else None, "{:.0f}"),
        ("adapter_bytes", "adapter size (bytes)", lambda r: r.get("adapter_bytes"), "{:,.0f}"),
    ]
    return cols


def _pct(r: dict) -> float | None:
    t, a = r.get("trainable_params"), r.get("all_params")
    return 100.0 * t / a if t is not None and a else None


def _memory(r: dict, kind: str) -> float | None:
    value = r.get("peak_cuda_bytes") if kind == "CUDA allocated" else r.get("peak_rss_bytes")
    return value / 2**20 if value is not None else None


def memory_kind(results: list[dict]) -> str:
    """CUDA runs report torch.cuda.max_memory_allocated; CPU runs the process's peak RSS."""
    return "CUDA allocated" if any(r.get("peak_cuda_bytes") is not None for r in results) else "RSS"


def status_of(r: dict) -> str:
    return "ok" if r.get("status") == "ok" else (r.get("error") or r.get("status") or "not run")


def table_rows(results: list[dict], task: str) -> tuple[list[tuple[str, str]], list[list[object]]]:
    """(header as (csv name, markdown title) pairs, rows of raw values: None for empty)."""
    score = pick_score(task, results)
    cols = _columns(score, memory_kind(results))
    header = [("method", "method"), ("method_name", "registered method")] + [(c[0], c[1]) for c in cols] + \
        [("status", "status")]
    rows = []
    for r in results:
        ok = r.get("status") == "ok"
        values = [_finite(get(r)) if ok else None for _, _, get, _ in cols]
        rows.append([r["label"], r.get("method", "")] + values + [status_of(r)])
    return header, rows


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_csv(path: str, results: list[dict], task: str) -> None:
    """Unrounded values; empty cells where a method failed or a number does not apply."""
    header, rows = table_rows(results, task)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([h[0] for h in header])
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    _write(path, buf.getvalue())


def markdown_table(results: list[dict], task: str) -> str:
    header, rows = table_rows(results, task)
    cols = _columns(pick_score(task, results), memory_kind(results))
    formats = ["{}", "{}"] + [c[3] for c in cols] + ["{}"]
    lines = ["| " + " | ".join(h[1] for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = []
        for value, fmt in zip(row, formats):
            text = "" if value is None else fmt.format(value)
            if len(text) > 200:  # a long error: the log and results.csv have it whole
                text = text[:197] + "..."
            cells.append(text.replace("|", "\\|").replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: str, results: list[dict], task: str, preamble: list[str]) -> str:
    text = "\n".join(preamble + ["", markdown_table(results, task), ""])
    _write(path, text)
    return text


def _write(path: str, text: str) -> None:
    from ..io.atomic import atomic_write_text

    atomic_write_text(path, text)


# ---- plots ---------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed (and none on a server)
    import matplotlib.pyplot as plt

    return plt


def plot_score_vs_params(path: str, results: list[dict], task: str, title: str) -> None:
    """Score against trainable parameters (log x axis), one labelled point per successful method. A method that
    trains nothing (in-context learning) sits at x = 1 with "(0 trained)" in its label: log axes have no 0."""
    plt = _pyplot()
    score = pick_score(task, results)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    # Colour i is the i-th method of the config in both plots, so a method looks the same in each.
    points = [(i, r, r.get("trainable_params"), r["after"].get(score.key)) for i, r in enumerate(results)
              if r.get("status") == "ok" and r.get("after") and _finite(r["after"].get(score.key)) is not None]
    for i, r, n, y in points:
        x = max(n or 0, 1)
        note = " (count unknown)" if n is None else (" (0 trained)" if n == 0 else "")
        ax.scatter([x], [y], s=40, zorder=3, color=f"C{i % 10}")
        ax.annotate(r["label"] + note, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{score.title} ({'higher' if score.higher_is_better else 'lower'} is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    failed = [r["label"] for r in results if r.get("status") != "ok"]
    if failed:
        fig.text(0.01, 0.01, "not shown (failed or not run): " + ", ".join(failed), fontsize=7, color="0.4")
    if not points:
        ax.text(0.5, 0.5, "no method finished", transform=ax.transAxes, ha="center")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save(fig, path)
    plt.close(fig)


def read_metrics(run_dir: str) -> list[dict]:
    """The records of a run's metrics.jsonl ([] when absent); a torn last line (killed run) is skipped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_loss_curves(path: str, results: list[dict], run_dirs: dict[str, str], title: str) -> None:
    """Train loss per logged step (a line per method, from metrics.jsonl) and eval loss (markers, same colour).
    Failed runs are drawn too, as far as they got, dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    drawn = 0
    for i, r in enumerate(results):
        records = read_metrics(run_dirs.get(r["label"], ""))
        train = [(d["step"], d["loss"]) for d in records if d.get("split") == "train" and _finite(d.get("loss")) is not None]
        evals = [(d["step"], d["loss"]) for d in records if d.get("split") == "eval" and _finite(d.get("loss")) is not None]
        if not train and not evals:
            continue
        color = f"C{i % 10}"
        style = "-" if r.get("status") == "ok" else "--"
        label = r["label"] + ("" if r.get("status") == "ok" else " (failed)")
        if train:
            ax.plot(*zip(*train), style, color=color, label=label, linewidth=1.3)
        if evals:
            ax.plot(*zip(*evals), "o", color=color, markersize=5, markeredgecolor="black", markeredgewidth=0.5,
                    label=None if train else label)
        drawn += 1
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (lines: train, per logged step; dots: eval)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, ncol=2 if drawn > 6 else 1)
    else:
        ax.text(0.5, 0.5, "no metrics.jsonl with losses", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: str) -> None:
    from ..io.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
