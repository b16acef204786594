"""The comparison's table: results.md and results.csv, one row per method (its seeds summarised) and the reference
rows a score is read against (chance, majority class, the base model without training).

Every number comes from a (method, seed)'s result JSON (written by the worker) or its run folder's metrics.jsonl; a
method whose every seed failed keeps its row, with its error as status and its number columns empty. Intervals and
seed spreads: stats.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .stats import CONFIDENCE, bootstrap_interval, fraction_interval, seed_spread

# ---- scores ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    key: str
    """Its CSV column and its name in a result's metrics."""
    title: str
    """Its name in the table header and on a plot's axis."""
    higher_is_better: bool
    interval: str | None
    """"Wilson" (a fraction of rows), "bootstrap" (a mean of per-row values) or None (no per-row values)."""
    value: Callable[[dict], float | None]
    """The score of one (method, seed) result (or a reference's metrics)."""
    rows: Callable[[dict], tuple[list[float], list[float] | None] | None] = lambda r: None
    """Per-row values (and weights) behind a bootstrap interval, when the result has them."""


def _after(key: str) -> Callable[[dict], float | None]:
    return lambda r: _finite((r.get("after") or {}).get(key))


def _generated(key: str) -> Callable[[dict], float | None]:
    """Mean of a per-row generation score of the trained model (the worker's `generation.after`)."""
    def get(r: dict) -> float | None:
        values = ((r.get("generation") or {}).get("after") or {}).get(key)
        return sum(values) / len(values) if values else None
    return get


def _generated_rows(key: str, weight: str | None = None):
    """The per-row values (and weights) of `generation.after`, for the bootstrap."""
    def get(r: dict):
        rec = (r.get("generation") or {}).get("after") or {}
        return (rec[key], rec[weight] if weight else None) if rec.get(key) else None
    return get


def _ratio(rec: dict) -> float | None:
    """Token-weighted mean loss from per-row sums."""
    return sum(rec["loss_sum"]) / sum(rec["tokens"]) if rec.get("tokens") and sum(rec["tokens"]) else None


ACCURACY = Score("accuracy", "accuracy", True, "Wilson", _after("accuracy"))
CLASSIFY_LOSS = Score("eval_loss", "eval loss", False, None, _after("loss"))
# The loop's eval loss; its interval from the worker's per-row sums (token-weighted, as the loop's mean is).
EVAL_LOSS = Score("eval_loss", "eval loss", False, "bootstrap", _after("loss"),
                  _generated_rows("loss_sum", "tokens"))
EXACT_MATCH = Score("exact_match", "exact match", True, "Wilson", _generated("exact_match"))
ROUGE_L = Score("rougeL", "ROUGE-L", True, "bootstrap", _generated("rougeL"), _generated_rows("rougeL"))


def scores(task: str, results: list[dict]) -> list[Score]:
    """The table's scores, the first being the headline (plotted): accuracy then eval loss for classification
    (every successful run reports accuracy); else eval loss, then exact match and ROUGE-L when generated."""
    ok = [r for r in results if r.get("status") == "ok" and r.get("after")]
    classifies = all("accuracy" in r["after"] for r in ok) if ok else task == "classify"
    if classifies:
        return [ACCURACY, CLASSIFY_LOSS]
    out = [EVAL_LOSS]
    if any((r.get("generation") or {}).get("after") for r in ok):
        out += [EXACT_MATCH, ROUGE_L]
    return out


def eval_rows(r: dict) -> int | None:
    """How many eval rows a result's scores were measured on."""
    n = ((r.get("data") or {}).get("counts") or {}).get("eval")
    return n if isinstance(n, int) and n > 0 else None


# ---- one row per method ------------------------------------------------------------------------------------------


@dataclass
class Cell:
    value: float | None = None
    low: float | None = None
    high: float | None = None
    sd: float | None = None
    per_seed: list[float] = field(default_factory=list)


@dataclass
class Row:
    label: str
    method: str
    results: list[dict]
    """Every seed's result, in seed order."""
    reference: bool = False
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.results if r.get("status") == "ok"]

    @property
    def status(self) -> str:
        if self.reference:
            return "reference"
        bad = [r for r in self.results if r.get("status") != "ok"]
        if not bad:
            return "ok"
        first = bad[0].get("error") or bad[0].get("status") or "not run"
        if not self.ok:
            return first
        return f"{len(self.ok)} of {len(self.results)} seeds ok; seed {bad[0].get('seed')}: {first}"

    def mean(self, get: Callable[[dict], float | None]) -> float | None:
        values = [v for v in (_finite(get(r)) for r in self.ok) if v is not None]
        return sum(values) / len(values) if values else None


def score_cell(score: Score, results: list[dict]) -> Cell:
    """Mean over seeds, its eval-row interval (stats.py) and the spread over seeds."""
    values = [v for v in (_finite(score.value(r)) for r in results) if v is not None]
    if not values:
        return Cell()
    mean = sum(values) / len(values)
    cell = Cell(mean, sd=seed_spread(values), per_seed=values)
    n = next((eval_rows(r) for r in results if eval_rows(r)), None)
    if score.interval == "Wilson" and n and 0 <= mean <= 1:
        cell.low, cell.high = fraction_interval(mean, n)
    elif score.interval == "bootstrap":
        rows = [score.rows(r) for r in results]
        if rows and all(rows) and len({len(v) for v, _ in rows}) == 1:
            # The seeds scored the same rows in the same order: resample rows, each the mean of its seeds' values.
            per_row = [sum(col) / len(col) for col in zip(*(v for v, _ in rows))]
            weights = None if rows[0][1] is None else [sum(col) / len(col) for col in zip(*(w for _, w in rows))]
            cell.low, cell.high = bootstrap_interval(per_row, weights)
    return cell


def group_results(results: list[dict], task: str) -> list[Row]:
    """One Row per label, in the order the labels first appear (the config's), every seed's result in it."""
    rows: dict[str, Row] = {}
    for r in results:
        rows.setdefault(r["label"], Row(r["label"], r.get("method", ""), [])).results.append(r)
    for row in rows.values():
        for score in scores(task, results):
            row.cells[score.key] = score_cell(score, row.ok)
    return list(rows.values())


def baseline_rows(results: list[dict], task: str) -> list[Row]:
    """The levels a score is read against, as rows of the table (and lines on the score plots).

    classify: chance (1 / number of labels), the majority class of the eval rows (what always answering the most
    common label scores), and the base model without training, asked zero-shot (the `before` of an icl entry,
    which scores the frozen model's answer to the bare prompt). The `before` of a trained method is not used: a
    new classification head starts random, so the model "before training" is at chance by construction.
    causal_lm / sft: the base model with adapters off (the worker's `generation.base`: eval loss from per-row
    sums, and the generation scores).
    """
    out: list[Row] = []
    ok = [r for r in results if r.get("status") == "ok"]
    headline = scores(task, results)[0]
    if headline is ACCURACY:
        data = next(((r.get("data") or {}) for r in ok if (r.get("data") or {}).get("label_counts")), {})
        labels, n = data.get("labels") or [], (data.get("counts") or {}).get("eval")
        if labels:
            out.append(_reference(f"chance (1/{len(labels)})", {"accuracy": 1 / len(labels)}, task, None))
        counts = (data.get("label_counts") or {}).get("eval") or {}
        if counts and n:
            top = max(counts, key=lambda k: (counts[k], k))
            out.append(_reference(f"majority class ({top}: {counts[top]} of {n})", {"accuracy": counts[top] / n},
                                  task, n))
        zero_shot = next((r for r in ok if r.get("method") == "icl" and (r.get("before") or {}).get("accuracy")
                          is not None), None)
        if zero_shot is not None:
            before = zero_shot["before"]
            out.append(_reference("base model, no training (zero-shot prompt)",
                                  {"accuracy": before["accuracy"], "eval_loss": before.get("loss")},
                                  task, eval_rows(zero_shot)))
        return out
    base = next((r for r in ok if (r.get("generation") or {}).get("base")), None)
    if base is not None:
        rec = base["generation"]["base"]
        row = Row("base model, no training (adapters off)", "reference", [], reference=True)
        # The base model's scores in the place of a trained model's, so that every Score reads them the same way.
        as_result = {**base, "after": {"loss": _ratio(rec)}, "generation": {"after": rec}}
        row.cells = {score.key: score_cell(score, [as_result]) for score in scores(task, results)}
        out.append(row)
    return out


def _reference(label: str, values: dict[str, float | None], task: str, n: int | None) -> Row:
    row = Row(label, "reference", [], reference=True)
    for key, value in values.items():
        if value is None:
            continue
        cell = Cell(value, per_seed=[value])
        if key == "accuracy" and n:
            cell.low, cell.high = fraction_interval(value, n)
        row.cells[key] = cell
    return row


# ---- the table ---------------------------------------------------------------------------------------------------


def memory_kind(results: list[dict]) -> str:
    """CUDA runs report torch.cuda.max_memory_allocated; CPU runs the process's peak RSS."""
    return "CUDA allocated" if any(r.get("peak_cuda_bytes") is not None for r in results) else "RSS"


def _memory_of(kind: str) -> Callable[[dict], float | None]:
    key = "peak_cuda_bytes" if kind == "CUDA allocated" else "peak_rss_bytes"
    return lambda r: r[key] / 2**20 if r.get(key) is not None else None


def _pct(r: dict) -> float | None:
    t, a = r.get("trainable_params"), r.get("all_params")
    return 100.0 * t / a if t is not None and a else None


def cost_columns(results: list[dict]) -> list[tuple[str, str, Callable[[dict], float | None], str]]:
    """(CSV column, markdown header, value of one result, format): means over a method's successful seeds."""
    kind = memory_kind(results)
    return [
        ("trainable_params", "trainable params", lambda r: r.get("trainable_params"), "{:,.0f}"),
        ("trainable_pct", "% of all", _pct, "{:.4f}"),
        ("peak_mem_mib", f"peak {kind} (MiB)", _memory_of(kind), "{:.0f}"),
        ("wall_s", "wall time (s)", lambda r: r.get("wall_seconds"), "{:.0f}"),
        ("train_s", "train time (s)", lambda r: r.get("train_seconds"), "{:.0f}"),
        ("tokens_per_s", "tokens/s", lambda r: r.get("tokens_per_s") if r.get("steps") else None, "{:.0f}"),
        ("adapter_bytes", "adapter size (bytes)", lambda r: r.get("adapter_bytes"), "{:,.0f}"),
    ]


def _score_header(score: Score, seeds: int) -> str:
    arrow = "higher is better" if score.higher_is_better else "lower is better"
    what = f"mean of {seeds} seeds, " if seeds > 1 else ""
    interval = f" [{CONFIDENCE:.0%} {score.interval} interval]" if score.interval else ""
    return f"{score.title} ({what}{arrow}){interval}"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def score_text(cell: Cell | None) -> str:
    """'0.7312 [0.6594, 0.7947]': the value, then its interval where it has one."""
    if cell is None or cell.value is None:
        return ""
    if cell.low is None:
        return _fmt(cell.value)
    return f"{_fmt(cell.value)} [{_fmt(cell.low)}, {_fmt(cell.high)}]"


def table(rows: list[Row], results: list[dict], task: str, seeds: int) -> tuple[list[str], list[list[str]]]:
    """The markdown table's header and cells."""
    score_list = scores(task, results)
    header = ["method", "registered method"]
    for score in score_list:
        header.append(_score_header(score, seeds))
        if seeds > 1:
            header.append(f"{score.title} sd over seeds")
        if score is EVAL_LOSS:
            header.append("perplexity")
    costs = cost_columns(results)
    header += [c[1] for c in costs] + ["status"]
    lines = []
    for row in rows:
        cells = [row.label, row.method]
        for score in score_list:
            cell = row.cells.get(score.key)
            cells.append(score_text(cell))
            if seeds > 1:
                cells.append(_fmt(cell.sd if cell else None))
            if score is EVAL_LOSS:
                cells.append(_fmt(perplexity(cell), 2))
        for _, _, get, fmt in costs:
            value = None if row.reference else row.mean(get)
            cells.append("" if value is None else fmt.format(value))
        cells.append(row.status)
        lines.append(cells)
    return header, lines


def perplexity(loss: Cell | None) -> float | None:
    """exp(mean eval loss per token), as the training loop reports it (capped at exp(50))."""
    return math.exp(min(loss.value, 50.0)) if loss is not None and loss.value is not None else None


def markdown_table(rows: list[Row], results: list[dict], task: str, seeds: int) -> str:
    header, lines = table(rows, results, task, seeds)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in lines:
        clipped = [c if len(c) <= 200 else c[:197] + "..." for c in cells]  # a long error: results.csv has it whole
        out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in clipped) + " |")
    return "\n".join(out)


def write_markdown(path: str, rows: list[Row], results: list[dict], task: str, seeds: int,
                   preamble: list[str]) -> str:
    text = "\n".join(preamble + ["", markdown_table(rows, results, task, seeds), ""])
    _write(path, text)
    return text


def write_csv(path: str, rows: list[Row], results: list[dict], task: str) -> None:
    """Unrounded values; per score its interval bounds, sd over seeds and every seed's value (';'-separated);
    empty cells where a method failed or a number does not apply."""
    score_list = scores(task, results)
    costs = cost_columns(results)
    header = ["method", "method_name", "seeds_ok", "seeds"]
    for score in score_list:
        header += [score.key, f"{score.key}_low", f"{score.key}_high", f"{score.key}_sd", f"{score.key}_per_seed"]
        if score is EVAL_LOSS:
            header.append("perplexity")
    header += [c[0] for c in costs] + ["status"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values: list[object] = [row.label, row.method, len(row.ok) if not row.reference else "",
                                ";".join(str(r.get("seed")) for r in row.results)]
        for score in score_list:
            cell = row.cells.get(score.key) or Cell()
            values += [cell.value, cell.low, cell.high, cell.sd, ";".join(repr(v) for v in cell.per_seed)]
            if score is EVAL_LOSS:
                values.append(perplexity(cell))
        values += [None if row.reference else row.mean(get) for _, _, get, _ in costs]
        values.append(row.status)
        writer.writerow(["" if v is None else v for v in values])
    _write(path, buf.getvalue())


def _finite(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _write(path: str, text: str) -> None:
    from ..io.atomic import atomic_write_text

    atomic_write_text(path, text)


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
