"""The comparison's figures: score_vs_params.png, loss_curves.png and score_vs_cost.png.

Method i of the config has the same colour, marker and line style in every figure (`style`), so a method is
recognised across them and two methods drawn on top of each other still show both markers. The reference levels
(chance, majority class, base model without training: report.baseline_rows) are horizontal lines on the score
axes; for accuracy the axis starts at chance, so the picture does not turn a 0.09-wide band into a ranking.
"""

from __future__ import annotations

import math

from .report import Row, read_metrics, scores

# tab10, then two more so that 12 methods get 12 colours; each also gets its own marker and line style.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#000000", "#b8860b")
MARKERS = "osD^vP*X<>pd"
LINESTYLES = ("-", "--", "-.", ":")
REFERENCE_STYLES = ("--", ":", "-.")  # chance, majority class, base model
EMA_WEIGHT = 0.6
"""Train-loss smoothing: TensorBoard's debiased exponential moving average with this weight per logged point."""


def style(i: int) -> dict:
    return {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def smooth(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Debiased EMA (TensorBoard's scalar smoothing): s_t = w s_{t-1} + (1 - w) x_t, divided by 1 - w^t so the
    first points are not pulled towards 0."""
    out, s = [], 0.0
    for t, x in enumerate(values, 1):
        s = weight * s + (1 - weight) * x
        out.append(s / (1 - weight ** t))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed (and none on a server)
    import matplotlib.pyplot as plt

    return plt


def _points(rows: list[Row], key: str, x_of) -> list[tuple[int, Row, float, float, float | None, float | None]]:
    """(style index, row, x, score, low, high) of every method row with a score and an x."""
    out = []
    for i, row in enumerate(r for r in rows if not r.reference):
        cell = row.cells.get(key)
        x = x_of(row)
        if cell is None or cell.value is None or x is None:
            continue
        out.append((i, row, x, cell.value, cell.low, cell.high))
    return out


def _draw_scores(ax, points, references: list[Row], key: str, higher_is_better: bool, legend: bool) -> None:
    for i, row, x, y, low, high in points:
        st = style(i)
        yerr = [[y - low], [high - y]] if low is not None else None
        seeds = len(row.ok)
        ax.errorbar([x], [y], yerr=yerr, fmt=st["marker"], color=st["color"], markersize=7, capsize=3,
                     markeredgecolor="black", markeredgewidth=0.5, elinewidth=1.2, zorder=3,
                     label=row.label + (f" ({seeds} seeds)" if seeds > 1 else ""))
    for j, ref in enumerate(references):
        cell = ref.cells.get(key)
        if cell is not None and cell.value is not None:
            ax.axhline(cell.value, color="0.35", linestyle=REFERENCE_STYLES[j % 3], linewidth=1.1, zorder=1,
                       label=f"{ref.label}: {cell.value:.3f}")
    values = [v for p in points for v in (p[3], p[4], p[5]) if v is not None]
    values += [r.cells[key].value for r in references if r.cells.get(key) and r.cells[key].value is not None]
    if values and key == "accuracy":
        # From chance (the lowest reference) up: the reader sees how far above chance each method is.
        floor = min(values)
        ax.set_ylim(max(0.0, floor - 0.03), min(1.0, max(values) + 0.03))
    if legend and ax.get_legend_handles_labels()[0]:  # nothing to name when every run failed (the report says why)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def _label_points(ax, points) -> None:
    """Each point's method name beside it; a name that would overlap one already placed moves down or up a line
    at a time (LoRA and DoRA often land on the same spot). Sizes are estimated from the font (7 pt: ~4.2 pt a
    character, 9 pt a line) and the axes' size, which is close enough to keep names apart."""
    to_axes = ax.transScale + ax.transLimits  # data -> axes fraction, whatever the scales
    w_in, h_in = ax.figure.get_size_inches() * ax.get_position().size
    line = 9 / 72 / h_in
    boxes: list[tuple[float, float, float, float]] = []
    for _, row, x, y, _, _ in sorted(points, key=lambda p: -p[3]):
        ax_x, ax_y = to_axes.transform((x, y))
        width = len(row.label) * 4.2 / 72 / w_in
        for k in range(13):  # 0, -1, +1, -2, +2, ... lines
            dy = (-1) ** k * ((k + 1) // 2) * line
            box = (ax_x + 0.01, ax_y + dy - line / 2, ax_x + 0.01 + width, ax_y + dy + line / 2)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        ax.annotate(row.label, (x, y), xytext=(7, dy * h_in * 72), textcoords="offset points", fontsize=7,
                    va="center", color="0.15")


def plot_score_vs_params(path: str, rows: list[Row], references: list[Row], results: list[dict], task: str,
                         title: str):
    """Headline score against trainable parameters (log x axis), one marker per method with its eval-row
    interval as a bar, and the reference levels as lines. A method that trains nothing (icl) sits at x = 1:
    a log axis has no 0."""
    plt = _pyplot()
    score = scores(task, results)[0]
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    points = _points(rows, score.key, lambda r: max(r.ok[0].get("trainable_params") or 0, 1) if r.ok else None)
    _draw_scores(ax, points, references, score.key, score.higher_is_better, legend=True)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; 0 is drawn at 1)")
    ax.set_ylabel(_axis_label(score))
    ax.set_title(f"{title}\n{_interval_note(score, results)}; lines: reference levels", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    _label_points(ax, points)
    _footer(fig, rows, points)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path)
    plt.close(fig)
    return fig  # closed (no memory held by pyplot); its artists stay readable (the tests check them)


def plot_cost(path: str, rows: list[Row], references: list[Row], results: list[dict], task: str, title: str,
              memory_title: str):
    """Headline score against wall time (left) and peak memory (right) of each method's process."""
    plt = _pyplot()
    score = scores(task, results)[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=120, sharey=True)
    mem_key = "peak_cuda_bytes" if "CUDA" in memory_title else "peak_rss_bytes"
    for ax, (xlabel, x_of) in zip(axes, [
            ("wall time of the method's process (s, mean over seeds)",
             lambda r: r.mean(lambda x: x.get("wall_seconds"))),
            (f"peak {memory_title} of the method's process (MiB)",
             lambda r: r.mean(lambda x: x[mem_key] / 2**20 if x.get(mem_key) is not None else None))]):
        points = _points(rows, score.key, x_of)
        _draw_scores(ax, points, references, score.key, score.higher_is_better, legend=ax is axes[-1])
        ax.margins(x=0.12)  # room for the rightmost method's name
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(True, alpha=0.3)
        _label_points(ax, points)
    axes[0].set_ylabel(_axis_label(score))
    fig.suptitle(f"{title}\n{_interval_note(score, results)}; lines: reference levels", fontsize=9)
    _footer(fig, rows, _points(rows, score.key, lambda r: 1))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path)
    plt.close(fig)
    return fig  # closed (no memory held by pyplot); its artists stay readable (the tests check them)


def _axis_label(score) -> str:
    better = "higher" if score.higher_is_better else "lower"
    return f"{score.title} ({better} is better)"


def _interval_note(score, results: list[dict]) -> str:
    from .report import eval_rows

    n = next((eval_rows(r) for r in results if eval_rows(r)), None)
    rows = f" over the {n} eval rows" if n else " over the eval rows"
    return f"bars: 95% {score.interval} interval{rows}" if score.interval else "no interval (no per-row values)"


def _footer(fig, rows: list[Row], points) -> None:
    shown = {p[1].label for p in points}
    missing = [r.label for r in rows if not r.reference and r.label not in shown]
    if missing:
        fig.text(0.01, 0.01, "not shown (failed or not run): " + ", ".join(missing), fontsize=7, color="0.4")
    if not points:
        fig.text(0.5, 0.5, "no method finished", ha="center")


def plot_loss_curves(path: str, rows: list[Row], title: str):
    """Train loss per logged step, smoothed (EMA_WEIGHT; the logged points themselves faint behind it), and
    eval loss (large markers with a black edge), one style per method. The first seed's run of each method.
    Failed runs are drawn as far as they got, labelled so; methods that take no optimizer steps (icl, features)
    are named below the plot instead."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    drawn, stepless = 0, []
    for i, row in enumerate(r for r in rows if not r.reference):
        if not row.results:
            continue
        first = row.results[0]
        records = read_metrics(first.get("run_dir", ""))
        train = [(d["step"], d["loss"]) for d in records if d.get("split") == "train" and _finite(d.get("loss"))]
        evals = [(d["step"], d["loss"]) for d in records if d.get("split") == "eval" and _finite(d.get("loss"))]
        if not train:  # no optimizer steps (icl, features): its scores are all at step 0, not a curve
            if first.get("status") == "ok":
                stepless.append(row.label)
            continue
        st = style(i)
        label = row.label + ("" if first.get("status") == "ok" else " (failed)")
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color=st["color"], linewidth=0.8, alpha=0.3, zorder=1)
            ax.plot(steps, smooth(list(losses)), color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                    markersize=4, linewidth=1.6, label=label, zorder=2)
        if evals:
            ax.plot(*zip(*evals), linestyle="none", marker=st["marker"], color=st["color"], markersize=8,
                    markeredgecolor="black", markeredgewidth=0.8, zorder=3)
        drawn += 1
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}\nlines: train loss, EMA-smoothed (weight {EMA_WEIGHT} per logged point; faint: as logged); "
                 "big markers with black edge: eval loss (step 0 = before training)", fontsize=9)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        ax.text(0.5, 0.5, "no metrics.jsonl with train losses", transform=ax.transAxes, ha="center")
    if stepless:
        fig.text(0.01, 0.01, "not drawn (no optimizer steps; scores in the table): " + ", ".join(stepless),
                 fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save(fig, path)
    plt.close(fig)
    return fig  # closed (no memory held by pyplot); its artists stay readable (the tests check them)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _save(fig, path: str) -> None:
    from ..io.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
