"""Run a comparison: each method in its own worker process, one after another, then the table and the plots.

Output folder (the shared train.output_dir):

    report/                        results.md  results.csv  score_vs_params.png  loss_curves.png  score_vs_cost.png and
                                   compare_config.yaml (the comparison as run: shared sections after overrides +
                                   methods); written whole by one folder swap (io/atomic.py), so a kill never
                                   leaves a new table beside an old plot
    runs/LABEL/                    the method's run folder: adapter/, metrics.jsonl, run_config.yaml (from the
                                   training loop), config.yaml (the worker's input: `peftlab train` reruns it
                                   alone) and result.json (scores and costs)
    logs/LABEL.log                 everything the worker printed (progress bar, warnings, traceback)
    seedS/runs/LABEL/, seedS/logs/  the same for training seed S, when `seeds:` > 1 (seed train.seed + k, k >= 1)

A (method, seed) whose result.json exists and was made with the same settings is not run again (an interrupted
compare continues where it stopped); `rerun=True` redoes it. A worker that dies without writing its result (killed by
the OOM killer, a segfault) gets a result.json written here, with the exit status and the log's last line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import yaml

from ..io.atomic import atomic_folder, remove_folder
from .config import CompareConfig, SeedRun, entry_summary
from .plots import plot_cost, plot_loss_curves, plot_score_vs_params
from .report import baseline_rows, group_results, memory_kind, write_csv, write_markdown


def run_dir(item: SeedRun) -> str:
    return item.run.train.output_dir


def result_path(item: SeedRun) -> str:
    return os.path.join(run_dir(item), "result.json")


def report_dir(config: CompareConfig) -> str:
    return os.path.join(config.output_dir, "report")


def log_path(config: CompareConfig, item: SeedRun) -> str:
    logs = os.path.join(config.output_dir, "logs") if item.index == 0 else \
        os.path.join(config.output_dir, f"seed{item.seed}", "logs")
    return os.path.join(logs, f"{item.label}.log")


def read_result(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def stored_result(item: SeedRun) -> tuple[dict | None, str]:
    """(the reusable stored result or None, why not reusable)."""
    result = read_result(result_path(item))
    if result is None:
        return None, "no result yet"
    if not item.made_with_these_settings(result.get("fingerprint")):
        return None, "settings changed since the stored result"
    return result, ""


def plan(config: CompareConfig, selected: list, rerun: bool = False) -> list[tuple[SeedRun, dict | None, str]]:
    """(run, the stored result to reuse or None to run it, why it runs) for each seed of each selected entry."""
    return [(item, None, "--rerun") if rerun else (item, *stored_result(item))
            for item in config.seed_runs(selected)]


def fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def score_text(result: dict) -> str:
    after = result.get("after") or {}
    if "accuracy" in after:
        return f"accuracy {after['accuracy']:.4f}"
    if "loss" in after:
        return f"eval loss {after['loss']:.4f}"
    return ""


def run_compare(config: CompareConfig, only: list[str] | None = None, rerun: bool = False,
                echo: bool = False, log: Callable[[str], None] = print, command: str = "") -> dict:
    """Run the selected methods (skipping reusable results unless `rerun`), then write the outputs.
    Returns {"results": [one dict per (method, seed) of the config, in order], "files": {name: path}}."""
    selected = config.select(only)
    os.makedirs(config.output_dir, exist_ok=True)

    todo, skipped = [], []
    for item in plan(config, selected, rerun):
        (skipped if item[1] else todo).append(item)
    seeds = f" x {config.seeds} seeds" if config.seeds > 1 else ""
    log(f"peftlab compare: {len(selected)} methods{seeds} on {config.model_label}, task {config.task}, "
        f"data {config.base['data'].get('train_file')} -> {config.output_dir} "
        f"({len(todo)} to run, {len(skipped)} reused)")
    start = time.time()
    durations: list[float] = []  # wall time of each method run here, for the ETA
    for item, result, _ in skipped:
        log(f"  {item.name}: reusing {os.path.relpath(result_path(item))} ({result.get('status')}"
            + (f", {score_text(result)}" if result.get("status") == "ok" else f": {result.get('error')}")
            + "); --rerun to redo")
    for i, (item, _, why) in enumerate(todo, 1):
        label = item.name
        summary = entry_summary(item.entry, config.base) + (f" train.seed={item.seed}" if item.index else "")
        log(f"[{i}/{len(todo)}] {label}: start ({summary}; {why}) "
            f"log {os.path.relpath(log_path(config, item))} | elapsed {fmt_seconds(time.time() - start)}")
        t0 = time.time()
        result = run_method(config, item, echo=echo, generate_base=not _has_base_generation(config))
        durations.append(time.time() - t0)
        left = len(todo) - i
        # ETA: the mean wall time of the methods run so far, times those left. Methods differ several-fold (full
        # fine-tuning vs a head), so it is a rough guide that sharpens as the run goes.
        eta = f", ETA {fmt_seconds(left * sum(durations) / len(durations))} for {left} left" if left else ""
        outcome = (f"ok, {score_text(result)}" if result.get("status") == "ok" else f"FAILED: {result.get('error')}")
        log(f"[{i}/{len(todo)}] {label}: {outcome} in {fmt_seconds(durations[-1])} | "
            f"elapsed {fmt_seconds(time.time() - start)}{eta}")

    results = collect_results(config)
    files, table = write_outputs(config, results, command)
    log("\n" + table)
    log("wrote " + ", ".join(os.path.relpath(p) for p in files.values()))
    return {"results": results, "files": files}


def collect_results(config: CompareConfig) -> list[dict]:
    """The stored result of every (method, seed) of the config, in order; "not run" for one that has none made
    with the current settings. Each carries its label, seed and run folder (the plots read metrics.jsonl there)."""
    results = []
    for item in config.seed_runs(config.entries):
        stored = read_result(result_path(item))
        if stored is None or not item.made_with_these_settings(stored.get("fingerprint")):  # or other settings
            stored = {"method": item.entry.method_name, "status": "not run",
                      "error": "not run" if stored is None else "not run with the current settings"}
        stored.update(label=item.label, seed=item.seed, seed_index=item.index, run_dir=run_dir(item))
        results.append(stored)
    return results


def _has_base_generation(config: CompareConfig) -> bool:
    """Whether a stored result of this comparison already scored the base model's generations: they are the same
    for every method (adapters off), so one worker computes them and the others skip that pass."""
    return not config.generate_max_tokens or any((r.get("generation") or {}).get("base")
                                                 for r in collect_results(config) if r.get("status") == "ok")


def run_method(config: CompareConfig, item: SeedRun, echo: bool = False, generate_base: bool = False) -> dict:
    """One worker process for `item`: its output streamed to its log file (and to stdout with echo); returns the
    result it wrote, or one made here from its exit status when it wrote none."""
    entry = item.entry
    folder = run_dir(item)
    if os.path.isdir(folder):  # redoing a method: its old metrics.jsonl would be appended to, its adapter mixed in
        remove_folder(folder)  # renamed away first: a kill never leaves a half-deleted run with its result.json
    os.makedirs(folder)
    config_file = os.path.join(folder, "config.yaml")
    with open(config_file, "w", encoding="utf-8") as fh:
        yaml.safe_dump(item.raw, fh, sort_keys=False)
    out = result_path(item)
    logfile = log_path(config, item)
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TQDM_MININTERVAL", "5")  # a log file, not a terminal: a progress line every 5 s is plenty
    cmd = [sys.executable, "-m", "peftlab.compare.worker", config_file, out, "--label", entry.label,
           "--started", repr(time.time()), "--generate-max-tokens", str(entry.generate_max_tokens)] + \
        (["--generate-base"] if generate_base and entry.generate_max_tokens else [])
    with open(logfile, "wb") as fh:
        fh.write(("$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            # Tee: the log gets every byte as it comes (tqdm's \r updates included), so `tail -f` shows progress.
            while chunk := os.read(proc.stdout.fileno(), 65536):
                fh.write(chunk)
                fh.flush()
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            code = proc.wait()
        except BaseException:  # Ctrl-C: the worker got the same SIGINT (same process group); do not leave it behind
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            proc.stdout.close()
    from .worker import write_json

    result = read_result(out)
    if result is None or result.get("status") not in ("ok", "error"):
        result = {"label": entry.label, "method": entry.method_name, "status": "error",
                  "error": died(code, logfile), "exit_code": code}
    if result.get("fingerprint") != item.fingerprint():
        # The worker writes the fingerprint of the config it read (equal to this one); it is missing when the worker
        # failed before reading it, and then this is the settings the failure belongs to.
        result["fingerprint"] = item.fingerprint()
        write_json(out, result)
    return result


def died(code: int, logfile: str) -> str:
    """The error line for a worker that wrote no result."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        why = " (out of memory? the kernel's OOM killer sends SIGKILL; see dmesg)" if -code == signal.SIGKILL else ""
        return f"worker killed by {name}{why}"
    last = ""
    try:
        with open(logfile, encoding="utf-8", errors="replace") as fh:
            lines = [line.strip() for line in fh.read().replace("\r", "\n").splitlines() if line.strip()]
        last = lines[-1] if lines else ""
    except OSError:
        pass
    return f"worker exited with status {code} without a result" + (f"; last log line: {last}" if last else "")


REPORT_FILES = ("results.md", "results.csv", "score_vs_params.png", "loss_curves.png", "score_vs_cost.png",
                "compare_config.yaml")


def write_outputs(config: CompareConfig, results: list[dict], command: str = "") -> tuple[dict[str, str], str]:
    """Write report/: the table (markdown, CSV), the three plots and compare_config.yaml, as one folder swapped in
    whole; returns ({file name: final path}, the markdown)."""
    final = report_dir(config)
    with atomic_folder(final) as staging:
        table = _write_report(config, results, command, staging)
    return {name: os.path.join(final, name) for name in REPORT_FILES}, table


def score_note(config: CompareConfig) -> str:
    generated = (f", exact match (Wilson) and ROUGE-L F-measure (bootstrap) of greedy continuations of the eval "
                 f"prompts (at most {config.generate_max_tokens} new tokens)" if config.generate_max_tokens else "")
    return ("Score: accuracy on the eval rows after training for classification (interval: 95% Wilson score interval "
            "over the eval rows, [low, high]); else the eval loss (95% BCa bootstrap interval over the eval rows, "
            f"perplexity beside it){generated}. ")


def references_note(task: str) -> str:
    if task == "classify":
        return ("Reference rows: chance, the majority class of the eval rows and the base model asked zero-shot (the "
                "icl entry's `before`; a new classification head starts random, so a trained method's `before` is "
                "chance by construction). ")
    return "Reference row: the base model with adapters off. "


def _write_report(config: CompareConfig, results: list[dict], command: str, out: str) -> str:
    files = {name: os.path.join(out, name) for name in REPORT_FILES}
    extra = {"seeds": config.seeds, **({"generate_max_tokens": config.generate_max_tokens}
                                       if config.generate_max_tokens else {})}
    methods = [{"name": e.label, "method": e.raw["method"],
                "train": {k: v for k, v in e.raw["train"].items() if k != "output_dir"}} for e in config.entries]
    yaml_text = yaml.safe_dump({**config.base, **extra, "methods": methods}, sort_keys=False)
    with open(files["compare_config.yaml"], "w", encoding="utf-8") as fh:
        fh.write(yaml_text)
    base = config.base
    data = base.get("data") or {}
    train = base.get("train") or {}
    devices = sorted({r.get("device") for r in results if r.get("device")})
    short = lambda x: os.path.basename(os.path.normpath(x)) if isinstance(x, str) and os.sep in x else x  # noqa: E731
    title = f"{short(config.model_label)} / {config.task} / {short(data.get('train_file'))}"
    budget = ", ".join(f"{k} {train[k]}" for k in ("max_steps", "epochs", "batch_size", "lr") if k in train)
    rows_text = ", ".join(f"{k} {data[k]}" for k in ("max_train_rows", "max_eval_rows", "max_length") if k in data)
    seeds = (f"{config.seeds} training seeds per method (train.seed + 0..{config.seeds - 1}; the same eval rows); "
             "scores are means over seeds, sd their sample standard deviation. " if config.seeds > 1 else "")
    preamble = [
        f"# peftlab compare: {title}",
        "",
        f"Made with `{command or 'peftlab compare ' + config.source}` from {config.source}.",
        f"Shared budget: {budget or 'train defaults'}; data: {rows_text or 'all rows'} (per-method train overrides: "
        f"see compare_config.yaml). Device: {', '.join(devices) or 'n/a'}; {os.cpu_count()} CPU cores seen.",
        score_note(config) + seeds + references_note(config.task) +
        "Peak memory: the method's own process (peak RSS on CPU; torch.cuda.max_memory_allocated on CUDA). "
        "Wall time: the whole worker (imports, model loading, evaluation before and after, saving); train time: "
        "the training loop alone. Adapter size: all files of the saved adapter folder.",
    ]
    rows = group_results(results, config.task)
    references = baseline_rows(results, config.task)
    table = write_markdown(files["results.md"], references + rows, results, config.task, config.seeds, preamble)
    write_csv(files["results.csv"], references + rows, results, config.task)
    plot_score_vs_params(files["score_vs_params.png"], rows, references, results, config.task, title)
    plot_loss_curves(files["loss_curves.png"], rows, title)
    plot_cost(files["score_vs_cost.png"], rows, references, results, config.task, title, memory_kind(results))
    return table
