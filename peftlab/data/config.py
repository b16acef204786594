"""What the data section of a run says, and the error every data problem raises.

`DataConfig` follows the project's convention (see peftlab/core/config.py): each field is documented by the
string literal directly under it, and `field_docs(DataConfig)` reads those back for `--help-config`.
A bad config value raises `ConfigError` (so the run-config builder can prefix where it came from); a problem
found in the files themselves (missing file, bad row, ...) raises `DataError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import ConfigError, check_number, field_docs

TASKS = ("causal_lm", "sft", "classify", "reward", "dpo")
"""The task modes: plain language modelling on text, supervised fine-tuning on prompt/response or chat rows
(only the response is trained), sequence classification, and two on preference pairs (prompt, chosen,
rejected): a reward model and DPO (see pairs.py)."""

PAIR_TASKS = ("reward", "dpo")
"""Tasks whose rows are preference pairs: {prompt, chosen, rejected} (+ margin for reward)."""

# Our names for the columns a row may have; `DataConfig.columns` maps these to the file's names.
COLUMN_NAMES = ("text", "label", "messages", "prompt", "response", "instruction", "input", "output",
                "chosen", "rejected", "margin")

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


class DataError(ValueError):
    """A data file or row is unusable. The message names the file, row and column, the value seen, and the fix."""


@dataclass
class DataConfig:
    """Where the rows come from and how they become token sequences."""

    train_file: str | list[str]
    """Training data: a .jsonl/.json/.csv/.parquet/.txt file, or a list of them (glob patterns allowed).
    A .txt file holds documents separated by blank lines ({"text": ...} each); with no blank line in it,
    each non-empty line is a document."""

    eval_file: str | list[str] | None = None
    """Evaluation data, same formats. None: eval rows are carved out of the training rows (eval_fraction)."""

    eval_fraction: float = 0.1
    """With no eval_file: the fraction of training rows held out for evaluation, chosen by `seed`
    (deterministic; the two parts never share a row). 0 means no evaluation rows."""

    max_eval_rows: int | None = None
    """Keep at most this many eval rows (a deterministic subset chosen by `seed`, in file order)."""

    max_train_rows: int | None = None
    """Keep at most this many training rows (a deterministic subset chosen by `seed`, in file order)."""

    seed: int = 0
    """Seed for the eval carve and the row caps; the same seed and files always give the same splits."""

    columns: dict[str, str] = field(default_factory=dict)
    """Our column names -> the file's, e.g. {text: review, label: sentiment}. Ours: text, label, messages,
    prompt, response, instruction, input, output; for preference pairs prompt, chosen, rejected, margin."""

    skip_bad_rows: bool = False
    """False: the first bad row (missing column, wrong type, empty text, unknown label, nothing left to train)
    raises an error naming file, row and column. True: such rows are skipped and counted in the report."""

    max_length: int = 512
    """Longest example in tokens; longer ones are truncated (sft keeps the response whole when it fits,
    cutting the prompt's start; otherwise the end is cut). Preference pairs: each of prompt + chosen and
    prompt + rejected, truncated as sft."""

    packing: bool = False
    """causal_lm / sft only: join examples into sequences of up to max_length tokens (an example is never
    split across sequences); attention never crosses from one example to another."""

    labels: list[str] | None = None
    """classify: the label set, in class-id order. None: the sorted set of labels found in the training file
    (numerically sorted when all are integers). A label outside the set is a bad row."""

    prompt_template: str | None = None
    """sft, plain prompt format (Python str.format): use {prompt} for prompt/response rows, {instruction} and
    {input} for instruction/output rows. None: an Alpaca-style prompt for instruction rows; for prompt rows
    the tokenizer's chat template when it has one, else "{prompt}\\n"."""

    def __post_init__(self) -> None:
        self.train_file = _file_list("train_file", self.train_file, required=True)
        if self.eval_file is not None:
            self.eval_file = _file_list("eval_file", self.eval_file, required=False) or None
        check_number("DataConfig", "eval_fraction", self.eval_fraction, low=0, high=1, high_inclusive=False)
        for name in ("max_eval_rows", "max_train_rows"):
            if getattr(self, name) is not None:
                check_number("DataConfig", name, getattr(self, name), low=1, integer=True)
        check_number("DataConfig", "seed", self.seed, integer=True)
        check_number("DataConfig", "max_length", self.max_length, low=2, integer=True)
        if not isinstance(self.columns, dict):
            raise ConfigError(f"DataConfig.columns={self.columns!r} is not valid; it maps our column names to "
                              f"the file's, e.g. {{text: review, label: sentiment}}.")
        for ours, theirs in self.columns.items():
            if ours not in COLUMN_NAMES:
                raise ConfigError(f"DataConfig.columns has key {ours!r}, which is not one of our column names "
                                  f"({', '.join(COLUMN_NAMES)}). Keys are ours, values the file's: "
                                  f"{{text: {ours}}} reads our 'text' from your column {ours!r}.")
            if not isinstance(theirs, str) or not theirs:
                raise ConfigError(f"DataConfig.columns[{ours!r}]={theirs!r} is not valid; give the file's column "
                                  f"name as a non-empty string.")
        if self.labels is not None:
            if not isinstance(self.labels, (list, tuple)) or not self.labels:
                raise ConfigError(f"DataConfig.labels={self.labels!r} is not valid; give a non-empty list of "
                                  f"label names, e.g. [negative, positive].")
            names = []
            for item in self.labels:
                if isinstance(item, bool) or not isinstance(item, (str, int)) or item == "":
                    raise ConfigError(f"DataConfig.labels has {item!r}; labels are non-empty strings or integers.")
                names.append(str(item))  # YAML `labels: [0, 1]` gives ints; rows' int labels are kept as strings
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ConfigError(f"DataConfig.labels lists {dupes} more than once; each label needs one class id.")
            self.labels = names
        if self.prompt_template is not None and not isinstance(self.prompt_template, str):
            raise ConfigError(f"DataConfig.prompt_template={self.prompt_template!r} is not valid; give a format "
                              f"string such as 'Question: {{prompt}}\\nAnswer: '.")

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        return field_docs(cls)


def _file_list(name: str, value, *, required: bool) -> list[str] | str:
    """Keep a single path as given (a str), check a list holds only non-empty strings."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        if value or not required:
            return list(value)
    raise ConfigError(f"DataConfig.{name}={value!r} is not valid; give a path (or a list of paths) to "
                      f".jsonl/.json/.csv/.parquet/.txt files.")


__all__ = ["COLUMN_NAMES", "DataConfig", "DataError", "PAIR_TASKS", "SUFFIXES", "TASKS"]
