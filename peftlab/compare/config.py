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

Each entry becomes one complete run config (the shared sections with its `method:` and `train:` on top); it is
built with the same code `peftlab train` uses, so a bad key or value gives the same error, prefixed with the entry.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from ..core.config import ConfigError
from ..train.config import RunConfig, _apply_override, _check_keys, build_run_config

TOP_KEYS = {"model", "task", "data", "train", "methods"}
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

    def fingerprint(self) -> str:
        return fingerprint(self.run)


def fingerprint(run: RunConfig) -> str:
    """The resolved run config (every default filled in) minus its output folder, as canonical JSON. A stored
    result whose fingerprint differs was made with other settings and is not reused."""
    resolved = run.to_dict()
    resolved["train"] = {k: v for k, v in resolved["train"].items() if k != "output_dir"}
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


def build_compare_config(raw: dict[str, Any], source: str = "the compare config") -> CompareConfig:
    if "method" in raw:
        raise ConfigError(f"{source}: a compare config lists its methods under `methods:` (a list), not `method:`; "
                          "e.g. methods: [lora, {name: lora_r8, method: {name: lora, r: 8}}].")
    _check_keys(raw, TOP_KEYS, source)
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{source}: `methods:` must be a non-empty list of method names or "
                          f"{{name: LABEL, method: {{name: METHOD, ...}}, train: {{...}}}} entries; got {methods!r}.")
    base = {k: copy.deepcopy(v) for k, v in raw.items() if k != "methods"}
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
    return CompareConfig(source=source, output_dir=output_dir, base=base, entries=entries)


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
