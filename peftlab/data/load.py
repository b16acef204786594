"""Local files -> checked rows, split into train and eval.

Reading: .jsonl/.json/.csv/.parquet go through HF `datasets` (into a throw-away cache folder, so nothing is
left in ~/.cache and a re-read always sees the file as it is now); .txt is split here into documents.
CSV cells are read as strings (no "NA" -> missing guessing): a label column of 0/1 gives labels "0"/"1",
exactly as integer labels from JSON do.

Checking: every row is checked for the task (see `_check_row`), and comes out normalised to our column
names plus its origin:

    causal_lm: {"text": str}
    sft:       {"messages": [{"role", "content"}, ...]} | {"prompt": str, "response": str}
               | {"instruction": str, "input": str, "output": str}
    classify:  {"text": str, "label": str}
    reward:    {"prompt": str, "chosen": str, "rejected": str} (+ "margin": float when the file has the column)
    dpo:       {"prompt": str, "chosen": str, "rejected": str}
    every row: "_file": the path it came from, "_row": its 1-based data row (jsonl: line number when the file
               has no blank lines; csv: the row after the header; txt: the document number)

A bad row raises a DataError naming file, row, column, the value seen and the fix; with skip_bad_rows it is
skipped and counted in `report["skipped"]` instead. Nothing is dropped without being counted.

Splitting (all deterministic in `seed`): eval rows come from eval_file, or are carved out of the training
rows (eval_fraction); then max_train_rows / max_eval_rows keep a seeded subset. Rows keep file order.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import random
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..io.names import clip  # a value for an error message: repr, cut to a limit
from .config import PAIR_TASKS, SUFFIXES, TASKS, DataConfig, DataError

ROLES = ("system", "user", "assistant")
SKIP_HINT = "or set `skip_bad_rows: true` to skip such rows (they are counted in the report)"
EXAMPLES_KEPT = 5  # file:row examples kept per skip reason in the report


@dataclass
class Splits:
    """Checked rows for training and evaluation, and what happened on the way (`report`)."""

    train: list[dict]
    eval: list[dict]
    report: dict
    labels: list[str] | None = None
    """classify: the label names in class-id order (also in report["labels"]); None for other tasks."""

    @property
    def label2id(self) -> dict[str, int] | None:
        return None if self.labels is None else {name: i for i, name in enumerate(self.labels)}


class SkipTally:
    """Counts skipped rows per reason, keeping a few file:row examples of each (shared with encoding)."""

    def __init__(self) -> None:
        self.reasons: dict[str, dict[str, Any]] = {}

    def add(self, reason: str, where: str) -> None:
        entry = self.reasons.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_KEPT:
            entry["examples"].append(where)

    @property
    def total(self) -> int:
        return sum(e["count"] for e in self.reasons.values())

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {k: {"count": v["count"], "examples": list(v["examples"])} for k, v in sorted(self.reasons.items())}


class BadRow(Exception):
    """One row is unusable: `column` (ours), a short `kind` (the report's reason), a sentence, value, fix."""

    def __init__(self, column: str, kind: str, detail: str, value: Any = None, fix: str = "",
                 show_value: bool = True) -> None:
        super().__init__(detail)
        self.column, self.kind, self.detail, self.value, self.fix = column, kind, detail, value, fix
        self.show_value = show_value


# ---- reading files ---------------------------------------------------------------------------------------

def expand_paths(spec: str | list[str], what: str) -> list[str]:
    """Paths (and glob patterns) -> existing files, in the order given (a pattern's matches sorted)."""
    out: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise DataError(f"{what}: the pattern {item!r} matches no file (looked from {os.getcwd()}).")
            out.extend(matches)
            continue
        path = os.path.expanduser(item)
        if not os.path.exists(path):
            raise DataError(f"{what}: file not found: {item} (absolute: {os.path.abspath(path)}). "
                            f"Check the path; relative paths are taken from {os.getcwd()}.")
        if os.path.isdir(path):
            raise DataError(f"{what}: {item} is a folder; name the files in it (a glob like {item}/*.jsonl works).")
        out.append(path)
    for path in out:
        if _suffix(path) not in SUFFIXES:
            raise DataError(f"{what}: {path} has an unsupported extension {_suffix(path)!r}; "
                            f"supported: {', '.join(SUFFIXES)}.")
    return out


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def read_rows(path: str) -> tuple[list[dict], list[str]]:
    """All rows of one file as dicts, and its column names."""
    suffix = _suffix(path)
    if suffix == ".txt":
        docs = _read_txt(path)
        return [{"text": d} for d in docs], ["text"]
    _check_has_content(path)
    import datasets  # heavy import, only when a structured file is read

    kwargs: dict[str, Any] = {}
    if suffix == ".csv":
        # Read every cell as a string and keep empty cells as "" (pandas would turn "NA", "null", "" into
        # missing values and "007" into 7).
        with open(path, encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), None)
        if not header:
            raise DataError(f"{path}: the CSV file is empty; it needs a header row naming the columns, then data.")
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}), "na_filter": False}
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[suffix]
    try:
        with _quiet_datasets(datasets), tempfile.TemporaryDirectory(prefix="peftlab-data-") as cache:
            ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache,
                                       keep_in_memory=True, **kwargs)
            rows, columns = ds.to_list(), list(ds.column_names)
    except DataError:
        raise
    except Exception as err:  # datasets/pyarrow errors name neither the file nor the line
        raise DataError(f"{path}: could not be read as {builder.upper()}: {_first_line(err)}"
                        f"{_locate_json_error(path)}. "
                        f"Fix the file (or convert it to .jsonl with one JSON object per line).") from err
    if suffix == ".json" and len(rows) == 1 and len(columns) == 1 and isinstance(rows[0][columns[0]], list):
        raise DataError(f"{path}: the file is one JSON object whose key {columns[0]!r} holds a list; the rows must be "
                        f"a top-level list of objects ([{{...}}, {{...}}]) or one object per line in a .jsonl file.")
    return rows, columns


def _check_has_content(path: str) -> None:
    """An empty file, or one of blank lines only, named as such (the readers below would say "StopIteration" or
    "corresponds to no data"). Reads at most the first 64 KB."""
    if _suffix(path) == ".parquet":
        return
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if not head.strip():
        what = "is empty (0 bytes)" if not head else "holds only blank lines"
        example = {".csv": "a header row naming the columns, then one row per line",
                   ".json": "a list of objects: [{...}, {...}]"}.get(_suffix(path), "one JSON object per line")
        raise DataError(f"{path}: the file {what}; it needs rows: {example}. Check that it is the right file and "
                        "that it was written completely.")


@contextlib.contextmanager
def _quiet_datasets(datasets):
    """No progress bars for a local read; restore the caller's setting afterwards."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _locate_json_error(path: str) -> str:
    """For a .jsonl file that failed to parse, name the first line that is not JSON."""
    if _suffix(path) != ".jsonl":
        return ""
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as err:
                        return f" (line {number} is not valid JSON: {err}; it reads {clip(line.strip(), 60)})"
    except (OSError, UnicodeDecodeError) as err:
        return f" ({err})"
    return ""


def _read_txt(path: str) -> list[str]:
    """Blank-line-separated documents; a file with no blank line between text is one document per line."""
    try:
        with open(path, encoding="utf-8") as fh:
            content = fh.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); re-save it as UTF-8.") from err
    content = content.replace("\r\n", "\n").strip("\n")
    if re.search(r"\n[ \t]*\n", content):
        parts = re.split(r"\n(?:[ \t]*\n)+", content)  # runs of blank lines are one separator, not empty documents
    else:
        parts = content.split("\n")
    return [p.strip("\n") for p in parts if p.strip()]


# ---- checking rows ---------------------------------------------------------------------------------------

class _Columns:
    """Our column names -> the file's (cfg.columns), and how to name a column in a message."""

    def __init__(self, mapping: dict[str, str], present: list[str]) -> None:
        self.mapping, self.present = mapping, present

    def theirs(self, ours: str) -> str:
        return self.mapping.get(ours, ours)

    def has(self, ours: str) -> bool:
        return self.theirs(ours) in self.present

    def get(self, row: dict, ours: str) -> Any:
        return row.get(self.theirs(ours))

    def describe(self, ours: str) -> str:
        theirs = self.theirs(ours)
        return f"'{ours}'" if theirs == ours else f"'{ours}' (your column '{theirs}')"


def _check_columns_exist(path: str, task: str, cols: _Columns) -> None:
    """A column absent from the whole file is a config problem, not a bad row: say so once, before any row."""
    needed = {"causal_lm": [["text"]], "classify": [["text", "label"]],
              "sft": [["messages"], ["prompt", "response"], ["instruction", "output"]],
              "reward": [["prompt", "chosen", "rejected"]], "dpo": [["prompt", "chosen", "rejected"]]}[task]
    if any(all(cols.has(c) for c in option) for option in needed):
        return
    seen = ", ".join(repr(c) for c in cols.present) or "none"
    if task == "sft":
        shapes = "'messages' (chat), or 'prompt' + 'response', or 'instruction' (+ 'input') + 'output'"
        raise DataError(f"{path}: from row 1 on, no sft columns: sft rows need {shapes}. Columns in the file: "
                        f"{seen}. Fix: map yours, e.g. `columns: {{prompt: question, response: answer}}`.")
    missing = [c for c in needed[0] if not cols.has(c)]
    example = ", ".join(f"{c}: <your column>" for c in missing)
    raise DataError(f"{path}: from row 1 on, column {', '.join(cols.describe(c) for c in missing)} is missing "
                    f"(task {task} needs {' and '.join(repr(c) for c in needed[0])}). Columns in the file: {seen}. "
                    f"Fix: `columns: {{{example}}}`.")


def _string(row: dict, cols: _Columns, ours: str) -> str:
    value = cols.get(row, ours)
    if value is None:
        raise BadRow(ours, "missing", "has no value", value,
                     f"give every row a {ours!r} value, or map another column with "
                     f"`columns: {{{ours}: <your column>}}`",
                     show_value=False)
    if not isinstance(value, str):
        raise BadRow(ours, "not a string", f"must be a string, not {type(value).__name__}", value,
                     f"write the {ours!r} value as a JSON string")
    if not value.strip():
        raise BadRow(ours, "empty", "is empty", value, f"give the row a non-empty {ours!r}")
    return value


def _label(row: dict, cols: _Columns, label_set: set[str] | None) -> str:
    value = cols.get(row, "label")
    if value is None:
        raise BadRow("label", "missing", "has no value", value,
                     "give every row a label, or map another column with `columns: {label: <your column>}`",
                     show_value=False)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRow("label", "wrong type", f"must be an integer or a string, not {type(value).__name__}", value,
                     "write labels as integers (0, 1, ...) or names (\"positive\", ...)")
    name = str(value)  # 1 and "1" are the same label
    if not name.strip():
        raise BadRow("label", "empty", "is empty", value, "give the row a label")
    if label_set is not None and name not in label_set:
        shown = ", ".join(sort_labels(label_set)[:20])
        raise BadRow("label", "not in label set", f"{name!r} is not in the label set [{shown}]", value,
                     "fix the row, or list every label in `labels: [...]`")
    return name


def _messages(row: dict, cols: _Columns) -> list[dict[str, str]]:
    value = cols.get(row, "messages")
    if not isinstance(value, list) or not value:
        raise BadRow("messages", "not a list of messages", "must be a non-empty list of {role, content} objects",
                     value, 'write messages as [{"role": "user", "content": ...}, {"role": "assistant", ...}]')
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or msg.get("role") is None or msg.get("content") is None:
            keys = sorted(k for k, v in msg.items() if v is not None) if isinstance(msg, dict) else None
            raise BadRow("messages", "malformed message",
                         f"message {i} needs keys 'role' and 'content' "
                         f"(it has {keys if keys is not None else 'no keys'})",
                         msg, "give each message a role and a content")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise BadRow("messages", "unknown role", f"message {i} has role {role!r}; roles are {', '.join(ROLES)}",
                         msg, "rename the role (e.g. human -> user, gpt -> assistant)")
        if not isinstance(content, str):
            raise BadRow("messages", "malformed message", f"message {i}'s content must be a string, not "
                         f"{type(content).__name__}", msg, "write the content as a string")
        if role == "assistant" and not content.strip():
            raise BadRow("messages", "empty assistant turn", f"message {i} is an empty assistant turn", msg,
                         "give every assistant turn some text")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("messages", "no assistant turn", "has no assistant turn, so nothing would be trained",
                     [m["role"] for m in out], "add the assistant's reply")
    return out


def _check_row(row: dict, task: str, cols: _Columns, label_set: set[str] | None) -> dict:
    """One raw row -> our normalised row, or BadRow."""
    if task == "causal_lm":
        return {"text": _string(row, cols, "text")}
    if task == "classify":
        return {"text": _string(row, cols, "text"), "label": _label(row, cols, label_set)}
    if task in PAIR_TASKS:
        return _pair(row, cols, task)
    # sft: the row's shape is decided by which columns hold a value (a file may mix shapes)
    if cols.get(row, "messages") is not None:
        return {"messages": _messages(row, cols)}
    if cols.get(row, "prompt") is not None or cols.get(row, "response") is not None:
        return {"prompt": _string(row, cols, "prompt"), "response": _string(row, cols, "response")}
    if cols.get(row, "instruction") is not None or cols.get(row, "output") is not None:
        extra = cols.get(row, "input")
        if extra is not None and not isinstance(extra, str):
            raise BadRow("input", "not a string", f"must be a string, not {type(extra).__name__}", extra,
                         "write 'input' as a string (or leave it out)")
        return {"instruction": _string(row, cols, "instruction"), "input": extra or "",
                "output": _string(row, cols, "output")}
    raise BadRow("messages", "missing", "the row has none of 'messages', 'prompt'+'response', "
                 "'instruction'+'output'", {k: v for k, v in row.items() if v is not None},
                 "fill one of those shapes in, or map your columns with `columns: {...}`")


def _pair(row: dict, cols: _Columns, task: str) -> dict:
    """A preference pair. A pair whose two responses are the same text prefers nothing (its DPO gradient is 0
    and its reward loss is log 2 whatever the model does), so it is a bad row. `margin` (reward only, read when
    the file has the column) is a number, e.g. how strongly the raters preferred `chosen`."""
    out = {side: _string(row, cols, side) for side in ("prompt", "chosen", "rejected")}
    if out["chosen"].strip() == out["rejected"].strip():
        raise BadRow("rejected", "same as chosen", "is the same text as 'chosen', so the pair prefers nothing",
                     out["rejected"], "drop the row or give it two different responses")
    if task == "reward" and cols.has("margin"):
        value = cols.get(row, "margin")
        if isinstance(value, str):  # CSV cells are read as text
            try:
                value = float(value)
            except ValueError:
                pass
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or abs(value) == float("inf"):
            raise BadRow("margin", "not a number", "must be a finite number", value,
                         "give every row a numeric margin (0 for none), or drop the column")
        out["margin"] = float(value)
    return out


def bad_row_message(path: str, row_number: int, err: BadRow, cols: _Columns | None = None) -> str:
    column = cols.describe(err.column) if cols is not None else f"'{err.column}'"
    seen = f" Seen: {clip(err.value)}." if err.show_value else ""
    fix = f" Fix: {err.fix}; {SKIP_HINT}." if err.fix else f" Fix: {SKIP_HINT}."
    return f"{path}, row {row_number}, column {column}: {err.detail}.{seen}{fix}"


def _check_file(path: str, task: str, cfg: DataConfig, label_set: set[str] | None, tally: SkipTally,
                split: str) -> tuple[list[dict], dict]:
    rows, columns = read_rows(path)
    cols = _Columns(cfg.columns, columns)
    if rows:
        _check_columns_exist(path, task, cols)
    kept = []
    for number, raw in enumerate(rows, 1):
        try:
            row = _check_row(raw, task, cols, label_set)
        except BadRow as err:
            if not cfg.skip_bad_rows:
                raise DataError(bad_row_message(path, number, err, cols)) from None
            tally.add(f"{split}: {err.column}: {err.kind}", f"{path}:{number}")
            continue
        row["_file"], row["_row"] = path, number
        kept.append(row)
    return kept, {"path": path, "split": split, "rows": len(rows), "kept": len(kept)}


def sort_labels(names) -> list[str]:
    """Integer-like labels numerically ("2" before "10"), anything else alphabetically."""
    names = set(names)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


# ---- splits ----------------------------------------------------------------------------------------------

def _seeded_subset(rows: list[dict], keep: int, seed: int, purpose: str) -> list[dict]:
    """`keep` rows chosen by (seed, purpose), in their original order."""
    if len(rows) <= keep:
        return rows
    chosen = sorted(random.Random(f"peftlab:{purpose}:{seed}").sample(range(len(rows)), keep))
    return [rows[i] for i in chosen]


def load_splits(cfg: DataConfig, task: str) -> Splits:
    """Read, check and split the rows of `cfg`'s files for `task` (one of TASKS)."""
    if task not in TASKS:
        raise DataError(f"task {task!r} is not known; use one of: {', '.join(TASKS)}.")
    if cfg.packing and task not in ("causal_lm", "sft"):
        raise DataError(f"packing applies to causal_lm and sft only ({task} reads one example per sequence); "
                        "set `packing: false`.")
    tally = SkipTally()
    files: list[dict] = []
    label_set = set(cfg.labels) if (task == "classify" and cfg.labels is not None) else None

    train: list[dict] = []
    for path in expand_paths(cfg.train_file, "train_file"):
        kept, info = _check_file(path, task, cfg, label_set, tally, "train")
        train.extend(kept)
        files.append(info)
    read = sum(f["rows"] for f in files)
    if not train:
        reasons = "; ".join(f"{k}: {v['count']}" for k, v in tally.as_dict().items()) or "the files hold no rows"
        raise DataError(f"No usable training rows in {', '.join(f['path'] for f in files)} "
                        f"({read} read; skipped: {reasons}). Fix the rows or the `columns:` mapping.")

    labels = None
    if task == "classify":
        labels = list(cfg.labels) if cfg.labels is not None else sort_labels(r["label"] for r in train)
        if len(labels) < 2:
            raise DataError(f"classify needs at least 2 labels; the training rows only have {labels}. "
                            f"Check the label column (`columns: {{label: <your column>}}`) or list `labels: [...]`.")
        label_set = set(labels)

    report: dict[str, Any] = {"task": task}
    if cfg.eval_file is not None:
        evals: list[dict] = []
        for path in expand_paths(cfg.eval_file, "eval_file"):
            kept, info = _check_file(path, task, cfg, label_set, tally, "eval")
            evals.extend(kept)
            files.append(info)
        report["eval_from"] = "eval_file"
    elif cfg.eval_fraction > 0:
        n = len(train)
        k = max(1, round(n * cfg.eval_fraction))
        if k >= n:
            raise DataError(f"eval_fraction={cfg.eval_fraction} of {n} usable training row(s) leaves no training "
                            f"row. Add rows, lower eval_fraction (0 means no eval), or give an eval_file.")
        held = set(random.Random(f"peftlab:eval-carve:{cfg.seed}").sample(range(n), k))
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        report["eval_from"] = f"{cfg.eval_fraction:g} of the training rows, chosen by seed {cfg.seed}"
    else:
        evals = []
        report["eval_from"] = "none (eval_fraction is 0 and no eval_file)"

    capped = {}
    if cfg.max_train_rows is not None and len(train) > cfg.max_train_rows:
        capped["train"] = {"from": len(train), "to": cfg.max_train_rows}
        train = _seeded_subset(train, cfg.max_train_rows, cfg.seed, "max-train-rows")
    if cfg.max_eval_rows is not None and len(evals) > cfg.max_eval_rows:
        capped["eval"] = {"from": len(evals), "to": cfg.max_eval_rows}
        evals = _seeded_subset(evals, cfg.max_eval_rows, cfg.seed, "max-eval-rows")

    read = sum(f["rows"] for f in files)
    report["counts"] = {"read": read, "skipped": tally.total, "train": len(train), "eval": len(evals)}
    report["files"] = files
    report["skipped"] = tally.as_dict()
    if capped:
        report["capped"] = capped
    if task == "sft":
        report["row_shapes"] = dict(Counter(_sft_shape(r) for r in train + evals))
    if task == "classify":
        report["labels"] = labels
        report["label_counts"] = {"train": dict(Counter(r["label"] for r in train)),
                                  "eval": dict(Counter(r["label"] for r in evals))}
    return Splits(train=train, eval=evals, report=report, labels=labels)


def _sft_shape(row: dict) -> str:
    return "chat" if "messages" in row else ("prompt/response" if "prompt" in row else "instruction/output")


__all__ = ["BadRow", "SkipTally", "Splits", "bad_row_message", "expand_paths", "load_splits", "read_rows",
           "sort_labels"]
