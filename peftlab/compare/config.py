"""The compare config: one shared run config plus a list of methods, each checked before anything runs.

    model: smollm2                    # the same sections as a `peftlab train` config ...
    task: classify
    data: {train_file: shipped:rotten_tomatoes, max_train_rows: 800}
    train: {output_dir: out/compare, batch_size: 16, lr: 3.0e-4}
    methods:                          # ... minus `method:`, plus a list of methods
      - vera                          # a registered name: that method with its defaults, label "vera"
      - name: lora_r8                 # a label (folder and table row name) ...
        method: {name: lora, r: 8}    # ... and a `method:` section exactly as in `peftlab train`
      - name: full
        method: full
        train: {lr: 2.0e-5}           # per-method train options win over the shared ones
    seeds: 1                          # optional, see SEEDS_DOC
    generate_max_tokens: 64           # optional, see GENERATE_DOC

Each entry becomes one complete run config (the shared sections with its `method:` and `train:` on top); it is
built with the same code `peftlab train` uses, so a bad key or value gives the same error, prefixed with the entry.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from ..core.config import ConfigError
from ..train.config import RunConfig, _apply_override, _check_keys, build_run_config

TOP_KEYS = {"model", "task", "data", "train", "methods", "seeds", "generate_max_tokens"}
LM_TASKS = ("causal_lm", "sft")
SEEDS_DOC = ("How many times each method runs, with train.seed, train.seed + 1, ... (the seed of the new weights' "
             "initialisation, dropout and the training data order; the train and eval rows stay those chosen by "
             "data.seed). The table shows the mean over seeds and their standard deviation; results.csv and each "
             "run's result.json keep every seed's value. Default 1. `peftlab compare --seeds N` overrides it.")
GENERATE_DOC = ("causal_lm and sft only: after training, each eval row's prompt is continued greedily by the trained "
                "model (and by the base model, adapters off, for the table's base row) for at most this many new "
                "tokens, and the text is scored against the row's reference by exact match and ROUGE-L (Google's "
                "rouge-score package, the F-measure of the longest common subsequence of words). sft: the prompt is "
                "the row's prompt part, the reference its response; causal_lm: the first half of the row's tokens "
                "and the rest, at most this many tokens. 0 turns generation off. Default 64.")
ENTRY_KEYS = {"name", "method", "train"}
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_UNSET = object()


@dataclass
class Entry:
    """One method of a comparison, resolved."""

    label: str
    """Row name in the table and folder name under the output folder (letters, digits, _ . -)."""

    raw: dict[str, Any]
    """The complete run config for this method, as YAML-ready plain data (what the worker reads)."""

    run: RunConfig
    """`raw` built and checked by the run-config builder `peftlab train` uses."""

    @property
    def method_name(self) -> str:
        return self.run.method_name

    generate_max_tokens: int = 0
    """The comparison's generate_max_tokens where generation applies (an LM task), else 0."""

    def fingerprint(self) -> str:
        return fingerprint(self.run, self.generate_max_tokens)


@dataclass
class SeedRun:
    """One (method, seed) run of a comparison: its own run config, folder, result and fingerprint."""

    entry: Entry
    index: int
    """0 for the method's own train.seed, k for train.seed + k."""
    run: RunConfig
    raw: dict[str, Any]

    @property
    def label(self) -> str:
        return self.entry.label

    @property
    def seed(self) -> int:
        return self.run.train.seed

    @property
    def name(self) -> str:
        """How logs name it: LABEL for the first seed, LABEL seed S for the others."""
        return self.label if self.index == 0 else f"{self.label} seed {self.seed}"

    def fingerprint(self) -> str:
        return fingerprint(self.run, self.entry.generate_max_tokens)

    def made_with_these_settings(self, stored: str | None) -> bool:
        return same_settings(stored, self.fingerprint(), self.run)


def same_settings(stored: str | None, current: str, run: RunConfig) -> bool:
    """Whether a result stored with fingerprint `stored` was made with the settings `current` describes.

    Equal fingerprints, or ones that differ only by options the stored one lacks and whose value now is their
    default: an option added to peftlab since the result was stored (with a default, which keeps the old behaviour)
    does not make every stored result stale. An option whose value differs, or one that is gone, does."""
    if stored == current:
        return True
    try:
        old, new = json.loads(stored), json.loads(current)
    except (TypeError, json.JSONDecodeError):
        return False
    defaults = _section_defaults(run)
    for section in set(old) | set(new):
        a, b = old.get(section), new.get(section)
        if not (isinstance(a, dict) and isinstance(b, dict)):
            if a != b:
                return False
            continue
        for key in set(a) | set(b):
            if key in a and key in b:
                if a[key] != b[key]:
                    return False
            elif key not in b or key not in defaults.get(section, {}) or defaults[section][key] != b[key]:
                return False
    return True


def _section_defaults(run: RunConfig) -> dict[str, dict[str, Any]]:
    """{section: {option: its default as the fingerprint's JSON writes it}} for the run's dataclass sections."""
    out: dict[str, dict[str, Any]] = {}
    for section in ("data", "train", "method", "ppo", "preference"):
        obj = getattr(run, section, None)
        if obj is None or not dataclasses.is_dataclass(obj):
            continue
        values = {}
        for f in dataclasses.fields(obj):
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
        out[section] = json.loads(json.dumps(values, sort_keys=True, default=str))
    return out


def fingerprint(run: RunConfig, generate_max_tokens: int = 0) -> str:
    """The resolved run config (every default filled in) minus its output folder, as canonical JSON, plus the
    generation length where generation runs. A stored result whose fingerprint differs was made with other
    settings and is not reused."""
    resolved = run.to_dict()
    resolved["train"] = {k: v for k, v in resolved["train"].items() if k != "output_dir"}
    if generate_max_tokens:
        resolved["generate_max_tokens"] = generate_max_tokens
    return json.dumps(resolved, sort_keys=True, default=str)


@dataclass
class CompareConfig:
    source: str
    """Where the config came from (file path, or the packaged default)."""

    output_dir: str
    """The comparison's folder: train.output_dir of the shared sections."""

    base: dict[str, Any]
    """The shared sections (model, task, data, train) after overrides."""

    entries: list[Entry]

    seeds: int = 1
    """Training seeds per method (SEEDS_DOC)."""

    generate_max_tokens: int = 0
    """Generation length for LM tasks (GENERATE_DOC); 0 for other tasks or when turned off."""

    def seed_runs(self, entries: list[Entry]) -> list[SeedRun]:
        """Every (method, seed) run of `entries`, method by method: seeds 0..N-1 of the first, then the next."""
        return [self.seed_run(entry, k) for entry in entries for k in range(self.seeds)]

    def seed_run(self, entry: Entry, index: int) -> SeedRun:
        if index == 0:
            return SeedRun(entry, 0, entry.run, entry.raw)
        raw = copy.deepcopy(entry.raw)
        raw["train"]["seed"] = entry.run.train.seed + index
        raw["train"]["output_dir"] = os.path.join(self.output_dir, f"seed{raw['train']['seed']}", "runs", entry.label)
        return SeedRun(entry, index, build_run_config(raw, f"{self.source}: {entry.label}"), raw)

    @property
    def task(self) -> str:
        return self.base.get("task", "classify")

    @property
    def model_label(self) -> str:
        """The base model as reports name it: `model: NAME`, or NAME (DTYPE) for the section form with a dtype."""
        model = self.base.get("model", "smollm2")
        if not isinstance(model, dict):
            return str(model)
        return f"{model.get('name', 'smollm2')}" + (f" ({model['dtype']})" if model.get("dtype") else "")

    def select(self, only: list[str] | None) -> list[Entry]:
        """The entries named in `only` (labels), in config order; all of them for None."""
        if not only:
            return list(self.entries)
        labels = [e.label for e in self.entries]
        unknown = [name for name in only if name not in labels]
        if unknown:
            near = {n: difflib.get_close_matches(n, labels, n=2, cutoff=0.5) for n in unknown}
            hints = "; ".join(f"{n!r}" + (f" (did you mean {', '.join(near[n])}?)" if near[n] else "") for n in unknown)
            raise ConfigError(f"--only names methods not in {self.source}: {hints}. Labels there: {', '.join(labels)}.")
        return [e for e in self.entries if e.label in only]


def default_compare_config_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "compare_default.yaml")


def load_compare_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> CompareConfig:
    """Read a compare config (the packaged default when `path` is None), apply key=value overrides to its shared
    sections, and build every method's run config. All problems are collected and raised together as one
    ConfigError, before any method runs."""
    source = str(path or default_compare_config_path())
    if not os.path.isfile(source):
        raise ConfigError(f"Compare config {source!r} does not exist. Give a YAML file (see "
                          f"{default_compare_config_path()} for the format), or no argument for the default.")
    with open(source, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a YAML mapping (model:, task:, data:, train:, methods:), "
                          f"not {type(raw).__name__}.")
    for item in overrides:
        if item.partition("=")[0].strip().split(".")[0] == "methods":
            raise ConfigError(f"Override {item!r}: key=value overrides apply to the shared sections (model, task, "
                              "data, train); change a method's own options in the config file's methods: list.")
        _apply_override(raw, item)
    return build_compare_config(raw, source)


def _count(raw: dict[str, Any], key: str, default: int, low: int, source: str, doc: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{source}: {key} must be a whole number >= {low}, not {value!r}. {key}: {doc}")
    return value


def build_compare_config(raw: dict[str, Any], source: str = "the compare config") -> CompareConfig:
    if "method" in raw:
        raise ConfigError(f"{source}: a compare config lists its methods under `methods:` (a list), not `method:`; "
                          "e.g. methods: [lora, {name: lora_r8, method: {name: lora, r: 8}}].")
    _check_keys(raw, TOP_KEYS, source)
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{source}: `methods:` must be a non-empty list of method names or "
                          f"{{name: LABEL, method: {{name: METHOD, ...}}, train: {{...}}}} entries; got {methods!r}.")
    seeds = _count(raw, "seeds", 1, 1, source, SEEDS_DOC)
    generate = _count(raw, "generate_max_tokens", 64, 0, source, GENERATE_DOC)
    base = {k: copy.deepcopy(v) for k, v in raw.items() if k not in ("methods", "seeds", "generate_max_tokens")}
    generate = generate if base.get("task", "classify") in LM_TASKS else 0
    # The shared sections alone first (with LoRA's defaults standing in for the method, which is always registered):
    # a mistake there would otherwise be reported once per method.
    build_run_config({**copy.deepcopy(base), "method": "lora"}, source)
    base_train = base.get("train") or {}
    if not isinstance(base_train, dict):
        raise ConfigError(f"{source}: train must be a mapping of options, not {base_train!r}.")
    output_dir = base_train.get("output_dir", "out/compare")

    entries, problems, seen = [], [], {}
    for i, item in enumerate(methods):
        where = f"{source}: methods[{i}]"
        try:
            entry = _entry(item, base, output_dir, where)
            entry.generate_max_tokens = generate
        except ConfigError as err:
            problems.append(str(err))
            continue
        if entry.label in seen:
            problems.append(f"{where}: label {entry.label!r} is already used by methods[{seen[entry.label]}]; give "
                            f"each entry its own name: (it names the row and the folder).")
            continue
        seen[entry.label] = i
        entries.append(entry)
    if problems:
        head = f"{len(problems)} problems in {source}, nothing was run: " if len(problems) > 1 else ""
        raise ConfigError(head + " | ".join(problems))
    return CompareConfig(source=source, output_dir=output_dir, base=base, entries=entries, seeds=seeds,
                         generate_max_tokens=generate)


def _entry(item: Any, base: dict[str, Any], output_dir: str, where: str) -> Entry:
    if isinstance(item, str):
        item = {"name": item, "method": item}
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: an entry is a method name (lora) or a mapping {{name: LABEL, method: ..., "
                          f"train: ...}}; got {item!r}.")
    _check_keys(item, ENTRY_KEYS, where)
    method = copy.deepcopy(item.get("method", item.get("name")))
    if method is None:
        raise ConfigError(f"{where}: no method; write method: lora (or {{name: lora, r: 8}}).")
    if isinstance(method, dict) and "name" not in method and "method" in method:
        method["name"] = method.pop("method")  # {method: lora, r: 8} reads as well as {name: lora, r: 8}
    method_name = method if isinstance(method, str) else (method.get("name") if isinstance(method, dict) else None)
    label = item.get("name", method_name)
    if not isinstance(label, str) or not LABEL_RE.match(label):
        raise ConfigError(f"{where}: name {label!r} must be a non-empty label of letters, digits, '_', '.', '-' "
                          "(it becomes a folder name), e.g. lora_r8.")
    where = f"{where} ({label})"
    train_overrides = item.get("train") or {}
    if not isinstance(train_overrides, dict):
        raise ConfigError(f"{where}: train must be a mapping of options (e.g. {{lr: 2.0e-5}}), not {train_overrides!r}.")
    if "output_dir" in train_overrides:
        raise ConfigError(f"{where}: train.output_dir is set by compare (OUTPUT/runs/{label}); set the shared "
                          "train.output_dir to move the whole comparison.")
    raw = copy.deepcopy(base)
    raw["method"] = method
    raw["train"] = {**(base.get("train") or {}), **copy.deepcopy(train_overrides),
                    "output_dir": os.path.join(output_dir, "runs", label)}
    run = build_run_config(raw, where)
    return Entry(label=label, raw=raw, run=run)


def entry_summary(entry: Entry, base: dict[str, Any]) -> str:
    """One line: the method's options and the train options that differ from the shared ones."""
    method = entry.raw["method"]
    options = {} if isinstance(method, str) else {k: v for k, v in method.items() if k != "name"}
    own_train = {k: v for k, v in entry.raw["train"].items()
                 if k != "output_dir" and (base.get("train") or {}).get(k, _UNSET) != v}
    parts = [entry.method_name] + [f"{k}={v}" for k, v in options.items()] + [f"train.{k}={v}" for k, v in own_train.items()]
    return " ".join(str(p) for p in parts)
