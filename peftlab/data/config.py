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
COLUMN_NAMES = ("text", "label", "messages", "conversations", "prompt", "response", "instruction", "input", "output",
                "chosen", "rejected", "margin")

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")

ROLES = ("system", "user", "assistant", "tool")
"""Our chat roles (OpenAI's). A tool turn (a function's result) is context, never trained."""


class DataError(ValueError):
    """A data file or row is unusable. The message names the file, row and column, the value seen, and the fix."""


@dataclass
class DataConfig:
    """Where the rows come from and how they become token sequences."""

    train_file: str | list[str]
    """Training data: a .jsonl/.json/.csv/.parquet/.txt file, a folder written by datasets' save_to_disk (a
    Dataset, or a DatasetDict: see split), a hub dataset id (org/name; see config, split, revision), or a list of
    these (glob patterns allowed). A .txt file holds documents separated by blank lines ({"text": ...} each);
    with no blank line in it, each non-empty line is a document."""

    eval_file: str | list[str] | None = None
    """Evaluation data, same formats. None: eval rows come from eval_split of train_file when eval_split is set,
    else they are carved out of the training rows (eval_fraction)."""

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
    conversations (ShareGPT), prompt, response, instruction, input, output; for preference pairs prompt, chosen,
    rejected, margin."""

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

    split: str | None = None
    """The split of train_file to read when it is a DatasetDict folder or a hub dataset. None: "train"."""

    eval_split: str | None = None
    """The split read as eval rows: of eval_file when it is a DatasetDict folder or a hub dataset (None: "train"),
    or, with no eval_file, of train_file's DatasetDict / hub dataset (e.g. test) instead of carving eval rows out."""

    config: str | None = None
    """Hub datasets: the configuration (subset) name, e.g. `en` (load_dataset's second argument)."""

    revision: str | None = None
    """Hub datasets: a branch, tag or commit to read (default: the main branch)."""

    roles: dict[str, str] = field(default_factory=dict)
    """Chat rows: role names of your data -> ours (system, user, assistant, tool), e.g. {narrator: system}.
    ShareGPT names are known already: human -> user; gpt, model, chatgpt, bing, bard, function_call ->
    assistant; tool, function, observation -> tool. Applies to `messages` roles and ShareGPT `from` values."""

    chat_template: str | None = None
    """Chat rows (and sft/reward/dpo prompt rows): a built-in template (chatml, llama-3, mistral, alpaca, zephyr,
    gemma) or a .jinja file, for bases without one (or to replace theirs, with a warning). Saved in the adapter
    folder as chat_template.jinja, which peftlab generate / serve / export use. None: the tokenizer's own."""

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
        for name in ("split", "eval_split", "config", "revision"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):  # YAML reads `revision: 1234567` as a number
                value = str(value)
                setattr(self, name, value)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"DataConfig.{name}={value!r} is not valid; give a non-empty string or leave it out.")
        if not isinstance(self.roles, dict) or any(not isinstance(k, str) or v not in ROLES
                                                   for k, v in self.roles.items()):
            raise ConfigError(f"DataConfig.roles={self.roles!r} is not valid; it maps your role names to ours "
                              f"({', '.join(ROLES)}), e.g. {{narrator: system, bot: assistant}}.")
        if self.chat_template is not None:
            from .templates import template_name_problem  # templates.py imports this module: import here

            problem = template_name_problem(self.chat_template) if isinstance(self.chat_template, str) and \
                self.chat_template else f"DataConfig.chat_template={self.chat_template!r} is not valid."
            if problem:
                raise ConfigError(problem)
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
                      f".jsonl/.json/.csv/.parquet/.txt files, save_to_disk folders or hub dataset ids.")


__all__ = ["COLUMN_NAMES", "DataConfig", "DataError", "PAIR_TASKS", "ROLES", "SUFFIXES", "TASKS"]
