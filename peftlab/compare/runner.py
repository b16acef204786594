"""Run a comparison: each method in its own worker process, one after another, then the table and the plots.

Output folder (the shared train.output_dir):

    report/                        results.md  results.csv  score_vs_params.png  loss_curves.png and
                                   compare_config.yaml (the comparison as run: shared sections after overrides +
                                   methods); written whole by one folder swap (io/atomic.py), so a kill never
                                   leaves a new table beside an old plot
    runs/LABEL/                    the method's run folder: adapter/, metrics.jsonl, run_config.yaml (from the
                                   training loop), config.yaml (the worker's input: `peftlab train` reruns it
                                   alone) and result.json (scores and costs)
    logs/LABEL.log                 everything the worker printed (progress bar, warnings, traceback)

A method whose result.json exists and was made with the same settings is not run again (an interrupted compare
continues where it stopped); `rerun=True` redoes it. A worker that dies without writing its result (killed by
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
from .config import CompareConfig, Entry, entry_summary
from .report import plot_loss_curves, plot_score_vs_params, write_csv, write_markdown


def run_dir(config: CompareConfig, label: str) -> str:
    return os.path.join(config.output_dir, "runs", label)


def result_path(config: CompareConfig, label: str) -> str:
    return os.path.join(run_dir(config, label), "result.json")


def report_dir(config: CompareConfig) -> str:
    return os.path.join(config.output_dir, "report")


def log_path(config: CompareConfig, label: str) -> str:
    return os.path.join(config.output_dir, "logs", f"{label}.log")


def read_result(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def stored_result(config: CompareConfig, entry: Entry) -> tuple[dict | None, str]:
    """(the reusable stored result or None, why not reusable)."""
    result = read_result(result_path(config, entry.label))
    if result is None:
        return None, "no result yet"
    if result.get("fingerprint") != entry.fingerprint():
        return None, "settings changed since the stored result"
    return result, ""


def plan(config: CompareConfig, selected: list[Entry], rerun: bool = False) -> list[tuple[Entry, dict | None, str]]:
    """(entry, the stored result to reuse or None to run it, why it runs) for each selected entry."""
    return [(entry, None, "--rerun") if rerun else (entry, *stored_result(config, entry)) for entry in selected]


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
    Returns {"results": [one dict per method of the config, in order], "files": {name: path}}."""
    selected = config.select(only)
    os.makedirs(config.output_dir, exist_ok=True)

    todo, skipped = [], []
    for item in plan(config, selected, rerun):
        (skipped if item[1] else todo).append(item)
    log(f"peftlab compare: {len(selected)} methods on {config.model_label}, task {config.task}, "
        f"data {config.base['data'].get('train_file')} -> {config.output_dir} "
        f"({len(todo)} to run, {len(skipped)} reused)")
    start = time.time()
    durations: list[float] = []  # wall time of each method run here, for the ETA
    for entry, result, _ in skipped:
        label = entry.label
        log(f"  {label}: reusing {os.path.relpath(result_path(config, label))} ({result.get('status')}"
            + (f", {score_text(result)}" if result.get("status") == "ok" else f": {result.get('error')}")
            + "); --rerun to redo")
    for i, (entry, _, why) in enumerate(todo, 1):
        label = entry.label
        log(f"[{i}/{len(todo)}] {label}: start ({entry_summary(entry, config.base)}; {why}) "
            f"log {os.path.relpath(log_path(config, label))} | elapsed {fmt_seconds(time.time() - start)}")
        t0 = time.time()
        result = run_method(config, entry, echo=echo)
        durations.append(time.time() - t0)
        left = len(todo) - i
        # ETA: the mean wall time of the methods run so far, times those left. Methods differ several-fold (full
        # fine-tuning vs a head), so it is a rough guide that sharpens as the run goes.
        eta = f", ETA {fmt_seconds(left * sum(durations) / len(durations))} for {left} left" if left else ""
        outcome = (f"ok, {score_text(result)}" if result.get("status") == "ok" else f"FAILED: {result.get('error')}")
        log(f"[{i}/{len(todo)}] {label}: {outcome} in {fmt_seconds(durations[-1])} | "
            f"elapsed {fmt_seconds(time.time() - start)}{eta}")

    results = []
    for entry in config.entries:
        stored = read_result(result_path(config, entry.label))
        if stored is None or stored.get("fingerprint") != entry.fingerprint():  # never run, or with other settings
            stored = {"label": entry.label, "method": entry.method_name, "status": "not run",
                      "error": "not run" if stored is None else "not run with the current settings"}
        stored["label"] = entry.label
        results.append(stored)
    files, table = write_outputs(config, results, command)
    log("\n" + table)
    log("wrote " + ", ".join(os.path.relpath(p) for p in files.values()))
    return {"results": results, "files": files}


def run_method(config: CompareConfig, entry: Entry, echo: bool = False) -> dict:
    """One worker process for `entry`: its output streamed to logs/LABEL.log (and to stdout with echo); returns the
    result it wrote, or one made here from its exit status when it wrote none."""
    folder = run_dir(config, entry.label)
    if os.path.isdir(folder):  # redoing a method: its old metrics.jsonl would be appended to, its adapter mixed in
        remove_folder(folder)  # renamed away first: a kill never leaves a half-deleted run with its result.json
    os.makedirs(folder)
    config_file = os.path.join(folder, "config.yaml")
    with open(config_file, "w", encoding="utf-8") as fh:
        yaml.safe_dump(entry.raw, fh, sort_keys=False)
    out = result_path(config, entry.label)
    logfile = log_path(config, entry.label)
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TQDM_MININTERVAL", "5")  # a log file, not a terminal: a progress line every 5 s is plenty
    cmd = [sys.executable, "-m", "peftlab.compare.worker", config_file, out, "--label", entry.label,
           "--started", repr(time.time())]
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
    if result.get("fingerprint") != entry.fingerprint():
        # The worker writes the fingerprint of the config it read (equal to this one); it is missing when the worker
        # failed before reading it, and then this is the settings the failure belongs to.
        result["fingerprint"] = entry.fingerprint()
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


REPORT_FILES = ("results.md", "results.csv", "score_vs_params.png", "loss_curves.png", "compare_config.yaml")


def write_outputs(config: CompareConfig, results: list[dict], command: str = "") -> tuple[dict[str, str], str]:
    """Write report/: the table (markdown, CSV), the two plots and compare_config.yaml, as one folder swapped in
    whole; returns ({file name: final path}, the markdown)."""
    final = report_dir(config)
    with atomic_folder(final) as staging:
        table = _write_report(config, results, command, staging)
    return {name: os.path.join(final, name) for name in REPORT_FILES}, table


def _write_report(config: CompareConfig, results: list[dict], command: str, out: str) -> str:
    files = {name: os.path.join(out, name) for name in REPORT_FILES}
    yaml_text = yaml.safe_dump(
        {**config.base, "methods": [{"name": e.label, "method": e.raw["method"],
                                     "train": {k: v for k, v in e.raw["train"].items() if k != "output_dir"}}
                                    for e in config.entries]}, sort_keys=False)
    with open(files["compare_config.yaml"], "w", encoding="utf-8") as fh:
        fh.write(yaml_text)
    base = config.base
    data = base.get("data") or {}
    train = base.get("train") or {}
    devices = sorted({r.get("device") for r in results if r.get("device")})
    short = lambda x: os.path.basename(os.path.normpath(x)) if isinstance(x, str) and os.sep in x else x  # noqa: E731
    title = f"{short(config.model_label)} / {config.task} / {short(data.get('train_file'))}"
    budget = ", ".join(f"{k} {train[k]}" for k in ("max_steps", "epochs", "batch_size", "lr") if k in train)
    rows = ", ".join(f"{k} {data[k]}" for k in ("max_train_rows", "max_eval_rows", "max_length") if k in data)
    preamble = [
        f"# peftlab compare: {title}",
        "",
        f"Made with `{command or 'peftlab compare ' + config.source}` from {config.source}.",
        f"Shared budget: {budget or 'train defaults'}; data: {rows or 'all rows'} (per-method train overrides: "
        f"see compare_config.yaml). Device: {', '.join(devices) or 'n/a'}; {os.cpu_count()} CPU cores seen.",
        "Score: accuracy on the eval rows after training for classification, else the eval loss (perplexity beside "
        "it). Peak memory: the method's own process (peak RSS on CPU; torch.cuda.max_memory_allocated on CUDA). "
        "Wall time: the whole worker (imports, model loading, evaluation before and after, saving); train time: "
        "the training loop alone. Adapter size: all files of the saved adapter folder.",
    ]
    table = write_markdown(files["results.md"], results, config.task, preamble)
    write_csv(files["results.csv"], results, config.task)
    plot_score_vs_params(files["score_vs_params.png"], results, config.task, title)
    plot_loss_curves(files["loss_curves.png"], results, {e.label: run_dir(config, e.label) for e in config.entries},
                     title)
    return table
