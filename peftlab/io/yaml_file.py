"""Reading a YAML config file (run config, compare config) with one-line errors, before anything heavy is imported:
`peftlab train missing.yaml` or a YAML syntax error answers at once, not after the torch import."""

from __future__ import annotations

import os

from .errors import ConfigError
from .names import clip

MAX_CONFIG_FILE_BYTES = 1 << 20  # a run config is a few hundred bytes; 1 MB is not a config


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """The file's top-level mapping; ConfigError (one line: what, where, what to do) for anything else."""
    import yaml

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"{what} {clip(path, 300)} does not exist (working folder {os.getcwd()}). Check the path; "
                            "the example configs are in configs/.")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {clip(path, 300)} is not a regular file (a folder or device); pass a YAML file.")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"{what} {clip(path, 300)} has {size:,} bytes (a config has a few hundred; at most "
                            f"{MAX_CONFIG_FILE_BYTES:,}). Pass the YAML config file.")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {clip(path, 300)} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{what} {clip(path, 300)} is not valid YAML{where}: {clip(problem, 120)[1:-1]}. Fix the "
                            "file (indentation and `key: value` pairs).") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {clip(path, 300)} must hold a YAML mapping (model:, task:, method:, data:, train:), "
                            f"not a {type(raw).__name__}.")
    return raw
