"""Local files, save_to_disk folders and hub datasets -> checked rows, split into train and eval.

Reading: .jsonl/.json/.csv/.parquet go through HF `datasets` (into a throw-away cache folder, so nothing is
left in ~/.cache and a re-read always sees the file as it is now); .txt is split here into documents;
save_to_disk folders and hub ids are read by hf_datasets.py (a DatasetDict's or hub dataset's `split`).
CSV cells are read as strings (no "NA" -> missing guessing): a label column of 0/1 gives labels "0"/"1",
exactly as integer labels from JSON do.

Checking: every row is checked for the task (see `_check_row`), and comes out normalised to our column
names plus its origin:

    causal_lm: {"text": str}
    sft:       {"messages": [{"role", "content"}, ...]} | {"prompt": str, "response": str}
               | {"instruction": str, "input": str, "output": str}
               ShareGPT rows ({"conversations": [{"from", "value"}, ...]}) become "messages" (+ "_format":
               "sharegpt"), their roles mapped by SHAREGPT_ROLES and `roles:`; a conversation must end on an
               assistant turn (every assistant turn is trained, encode.py).
    classify:  {"text": str, "label": str}
    reward:    {"prompt": str, "chosen": str, "rejected": str} (+ "margin": float when the file has the column)
    dpo:       {"prompt": str, "chosen": str, "rejected": str}
    every row: "_file": the path it came from ("folder[split]" / "hub:org/name[split]" for datasets), "_row":
               its 1-based data row (jsonl: line number when the file has no blank lines; csv: the row after the
               header; txt: the document number; datasets: the row in the split)

A bad row raises a DataError naming file, row, column, the value seen and the fix; with skip_bad_rows it is
skipped and counted in `report["skipped"]` instead. Nothing is dropped without being counted.

Splitting (all deterministic in `seed`): eval rows come from eval_file, or from eval_split of train_file's
datasets, or are carved out of the training rows (eval_fraction); then max_train_rows / max_eval_rows keep a
seeded subset. Rows keep file order.
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
from .config import PAIR_TASKS, ROLES, SUFFIXES, TASKS, DataConfig, DataError
from .hf_datasets import describe, first_line, is_saved_dataset, looks_like_hub_id, read_hub, read_saved

# ShareGPT's `from` names (lower-cased) -> ours. The original ShareGPT dumps name the model gpt/chatgpt/bing/bard,
# FastChat human/gpt, Gemini-style data user/model; LLaMA-Factory's tool-use ShareGPT calls the model's function call
# function_call (model output: trained) and the tool's answer observation (context: never trained).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "function_call": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
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

def expand_sources(spec: str | list[str], what: str, hub_ids: bool = True) -> list[tuple[str, str]]:
    """Paths, glob patterns, save_to_disk folders and hub ids -> [(kind, name)], kind "file" | "saved" | "hub",
    in the order given (a pattern's matches sorted). A name that exists here is local; only a name that does not
    (and looks like org/name) is a hub id."""
    out: list[tuple[str, str]] = []
    for item in [spec] if isinstance(spec, str) else spec:
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise DataError(f"{what}: the pattern {item!r} matches no file (looked from {os.getcwd()}).")
            out.extend(_local_source(m, m, what) for m in matches)
            continue
        path = os.path.expanduser(item)
        if os.path.exists(path):
            out.append(_local_source(item, path, what))
        elif hub_ids and looks_like_hub_id(item) and _suffix(item) not in SUFFIXES:
            out.append(("hub", item))
        else:
            raise DataError(f"{what}: file not found: {item} (absolute: {os.path.abspath(path)}). "
                            f"Check the path; relative paths are taken from {os.getcwd()}.")
    for kind, path in out:
        if kind == "file" and _suffix(path) not in SUFFIXES:
            raise DataError(f"{what}: {path} has an unsupported extension {_suffix(path)!r}; "
                            f"supported: {', '.join(SUFFIXES)}, or a save_to_disk folder.")
    return out


def _local_source(item: str, path: str, what: str) -> tuple[str, str]:
    if not os.path.isdir(path):
        return "file", path
    if is_saved_dataset(path):
        return "saved", path
    raise DataError(f"{what}: {item} is a folder, but not one written by datasets' save_to_disk (it has no "
                    f"{' or '.join(('dataset_dict.json', 'state.json'))}); name the files in it (a glob like "
                    f"{item}/*.jsonl works).")


def expand_paths(spec: str | list[str], what: str) -> list[str]:
    """Paths (and glob patterns) -> existing files, for readers that take files only (ppo prompts)."""
    out = []
    for kind, name in expand_sources(spec, what, hub_ids=False):
        if kind != "file":
            raise DataError(f"{what}: {name} is a save_to_disk folder; this reader takes .jsonl/.json/.csv/.parquet/"
                            f".txt files. Write the rows to a .jsonl file (`Dataset.to_json(path)`).")
        out.append(name)
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
        raise DataError(f"{path}: could not be read as {builder.upper()}: {first_line(err)}"
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
              "sft": [["messages"], ["conversations"], ["prompt", "response"], ["instruction", "output"]],
              "reward": [["prompt", "chosen", "rejected"]], "dpo": [["prompt", "chosen", "rejected"]]}[task]
    if any(all(cols.has(c) for c in option) for option in needed):
        return
    seen = ", ".join(repr(c) for c in cols.present) or "none"
    if task == "sft":
        shapes = ("'messages' (chat), or 'conversations' (ShareGPT), or 'prompt' + 'response', or 'instruction' "
                  "(+ 'input') + 'output'")
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


def _messages(row: dict, cols: _Columns, roles: dict[str, str]) -> list[dict[str, str]]:
    """OpenAI-style `messages`: [{role, content}, ...]; roles are ours, or mapped by `roles:`."""
    return _conversation(cols.get(row, "messages"), "messages", ("role", "content"), roles, {})


def _sharegpt(row: dict, cols: _Columns, roles: dict[str, str]) -> list[dict[str, str]]:
    """ShareGPT `conversations`: [{from, value}, ...]; `from` read through SHAREGPT_ROLES and `roles:`."""
    return _conversation(cols.get(row, "conversations"), "conversations", ("from", "value"), roles, SHAREGPT_ROLES)


def _conversation(value, column: str, keys: tuple[str, str], roles: dict[str, str],
                  known: dict[str, str]) -> list[dict[str, str]]:
    """A list of turns -> [{role, content}] in our roles. The conversation must train something and end on it:
    at least one assistant turn, and the last turn the assistant's (a trailing user turn is a cut conversation)."""
    who, what = keys
    example = f'[{{"{who}": "{"human" if known else "user"}", "{what}": ...}}, ' \
              f'{{"{who}": "{"gpt" if known else "assistant"}", "{what}": ...}}]'
    if not isinstance(value, list) or not value:
        raise BadRow(column, "not a list of messages", f"must be a non-empty list of {{{who}, {what}}} objects",
                     value, f"write {column} as {example}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or msg.get(who) is None or msg.get(what) is None:
            present = sorted(k for k, v in msg.items() if v is not None) if isinstance(msg, dict) else None
            raise BadRow(column, "malformed message",
                         f"message {i} needs keys {who!r} and {what!r} "
                         f"(it has {present if present is not None else 'no keys'})",
                         msg, f"give each message a {who} and a {what}" + (
                             " (turns written as role/content: read the column as messages with `columns: "
                             f"{{messages: {column}}}`)" if known and isinstance(msg, dict) and "role" in msg else ""))
        name, content = msg[who], msg[what]
        role = None
        if isinstance(name, str):  # `roles:` first, then ShareGPT's names (any case), or ours as they are
            role = roles.get(name) or (known.get(name.lower()) if known else (name if name in ROLES else None))
        if role is None:
            mapped = f"; known: {', '.join(sorted(known))}" if known else f"; ours are {', '.join(ROLES)}"
            raise BadRow(column, "unknown role", f"message {i} has {who} {name!r}{mapped}", msg,
                         f"map it to one of ours with `roles: {{{name}: user}}` (or assistant, system, tool)")
        if not isinstance(content, str):
            raise BadRow(column, "malformed message", f"message {i}'s {what} must be a string, not "
                         f"{type(content).__name__}", msg, f"write the {what} as a string")
        if role == "assistant" and not content.strip():
            raise BadRow(column, "empty assistant turn", f"message {i} is an empty assistant turn", msg,
                         "give every assistant turn some text")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow(column, "no assistant turn", "has no assistant turn, so nothing would be trained",
                     [m["role"] for m in out], "add the assistant's reply")
    if out[-1]["role"] != "assistant":
        raise BadRow(column, f"ends on a {out[-1]['role']} turn",
                     f"ends on a {out[-1]['role']} turn (message {len(out) - 1}), which nothing answers",
                     [m["role"] for m in out], "add the assistant's reply, or drop the last turn")
    return out


def _check_row(row: dict, task: str, cols: _Columns, label_set: set[str] | None,
               roles: dict[str, str] | None = None) -> dict:
    """One raw row -> our normalised row, or BadRow."""
    if task == "causal_lm":
        return {"text": _string(row, cols, "text")}
    if task == "classify":
        return {"text": _string(row, cols, "text"), "label": _label(row, cols, label_set)}
    if task in PAIR_TASKS:
        return _pair(row, cols, task)
    # sft: the row's shape is decided by which columns hold a value (a file may mix shapes)
    if cols.get(row, "messages") is not None:
        return {"messages": _messages(row, cols, roles or {})}
    if cols.get(row, "conversations") is not None:
        return {"messages": _sharegpt(row, cols, roles or {}), "_format": "sharegpt"}
    if cols.get(row, "prompt") is not None or cols.get(row, "response") is not None:
        return {"prompt": _string(row, cols, "prompt"), "response": _string(row, cols, "response")}
    if cols.get(row, "instruction") is not None or cols.get(row, "output") is not None:
        extra = cols.get(row, "input")
        if extra is not None and not isinstance(extra, str):
            raise BadRow("input", "not a string", f"must be a string, not {type(extra).__name__}", extra,
                         "write 'input' as a string (or leave it out)")
        return {"instruction": _string(row, cols, "instruction"), "input": extra or "",
                "output": _string(row, cols, "output")}
    raise BadRow("messages", "missing", "the row has none of 'messages', 'conversations', 'prompt'+'response', "
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


def _read_source(kind: str, name: str, cfg: DataConfig, split: str | None, split_key: str,
                 what: str) -> tuple[list[dict], list[str], str]:
    """(rows, columns, how to name the source in messages) for one source of expand_sources."""
    if kind == "file":
        return (*read_rows(name), name)
    if kind == "saved":
        rows, columns, used = read_saved(name, split, split_key, what)
    else:
        rows, columns, used = read_hub(name, split, split_key, cfg.config, cfg.revision, what)
    return rows, columns, describe(kind, name, used)


def _check_source(kind: str, name: str, task: str, cfg: DataConfig, label_set: set[str] | None, tally: SkipTally,
                  split: str, choose: str | None = None, split_key: str = "split") -> tuple[list[dict], dict]:
    """Read one source and check its rows. `split`: train | eval (for the report); `choose`: the dataset split."""
    rows, columns, path = _read_source(kind, name, cfg, choose, split_key, f"{split}_file")
    cols = _Columns(cfg.columns, columns)
    if rows:
        _check_columns_exist(path, task, cols)
    kept = []
    for number, raw in enumerate(rows, 1):
        try:
            row = _check_row(raw, task, cols, label_set, cfg.roles)
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
    train_sources = expand_sources(cfg.train_file, "train_file")
    for kind, name in train_sources:
        kept, info = _check_source(kind, name, task, cfg, label_set, tally, "train", cfg.split)
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
    if cfg.eval_file is not None or cfg.eval_split is not None:
        # eval_file, or with none the eval_split of train_file's datasets (a DatasetDict's test split, say)
        sources = expand_sources(cfg.eval_file, "eval_file") if cfg.eval_file is not None else train_sources
        files_only = [name for kind, name in sources if kind == "file"]
        if cfg.eval_file is None and files_only:
            raise DataError(f"eval_split={cfg.eval_split!r} reads a split of train_file's datasets, but "
                            f"{files_only[0]} is a file (files have no splits). Fix: give an eval_file, or use "
                            f"eval_fraction without eval_split.")
        evals: list[dict] = []
        for kind, name in sources:
            kept, info = _check_source(kind, name, task, cfg, label_set, tally, "eval", cfg.eval_split, "eval_split")
            evals.extend(kept)
            files.append(info)
        report["eval_from"] = "eval_file" if cfg.eval_file is not None else f"split {cfg.eval_split} of train_file"
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
    if "messages" in row:
        return "chat (ShareGPT)" if row.get("_format") == "sharegpt" else "chat"
    return "prompt/response" if "prompt" in row else "instruction/output"


__all__ = ["BadRow", "SHAREGPT_ROLES", "SkipTally", "Splits", "bad_row_message", "expand_paths", "expand_sources",
           "load_splits", "read_rows",
           "sort_labels"]
