"""Rows from HF `datasets`: a folder written by `save_to_disk`, or a dataset id on the hub.

    data: {train_file: out/my_dataset}                          # Dataset.save_to_disk folder
    data: {train_file: out/my_dict, split: train, eval_split: test}  # DatasetDict.save_to_disk folder
    data: {train_file: org/name, config: en, split: train, revision: v1.0}  # hub id (needs the network once)

A name is read as a hub id only when it is neither a file nor a folder here, so a local path always wins; the
errors for a hub id that cannot be read say that it was not found locally either. Hub datasets go through
`datasets.load_dataset` and its usual cache (~/.cache/huggingface), so a dataset read once online is read again
offline (HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1) from that cache.
"""

from __future__ import annotations

import os
import re

from .config import DataError

SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes: DatasetDict / Dataset
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_saved_dataset(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in SAVED_MARKERS)


def looks_like_hub_id(item: str) -> bool:
    """org/name or name: letters, digits, '-', '_', '.'; not an absolute or ./ path."""
    return bool(_HUB_ID.fullmatch(item)) and not item.startswith(".")


def _rows(ds) -> tuple[list[dict], list[str]]:
    return ds.to_list(), list(ds.column_names)


def read_saved(folder: str, split: str | None, split_key: str, what: str) -> tuple[list[dict], list[str], str]:
    """(rows, columns, split read) of a save_to_disk folder; `split_key` names the config field in errors."""
    import datasets

    try:
        loaded = datasets.load_from_disk(folder)
    except Exception as err:  # a folder save_to_disk did not finish, or written by another datasets major version
        raise DataError(f"{what}: {folder} looks like a save_to_disk folder but could not be read "
                        f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}). "
                        f"Write it again with `.save_to_disk(...)`.") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataError(f"{what}: {folder} is a DatasetDict with the splits {', '.join(map(repr, loaded))}, "
                            f"and no split {name!r}. Fix: `{split_key}: {next(iter(loaded), 'train')}` (one of "
                            f"those).")
        return (*_rows(loaded[name]), name)
    if split is not None:
        raise DataError(f"{what}: {folder} holds one Dataset (save_to_disk of a Dataset, no splits), so "
                        f"`{split_key}: {split}` cannot be read from it. Fix: drop `{split_key}`"
                        f"{' and use eval_fraction or an eval_file' if split_key == 'eval_split' else ''}.")
    return (*_rows(loaded), "")


def read_hub(name: str, split: str | None, split_key: str, config: str | None, revision: str | None,
             what: str) -> tuple[list[dict], list[str], str]:
    """(rows, columns, split read) of hub dataset `name`; one-line DataErrors for offline, unknown and bad split."""
    import datasets

    split = split or "train"
    call = f"datasets.load_dataset({name!r}{f', {config!r}' if config else ''}" \
           f"{f', revision={revision!r}' if revision else ''})"
    local = f"{name!r} is not a file or folder here (absolute: {os.path.abspath(name)}), so it was read as a hub " \
            f"dataset id"
    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision)
    except ConnectionError as err:  # datasets raises it for offline mode and for an unreachable hub
        offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
        why = ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the datasets cache"
               if offline else f"the hub could not be reached ({first_line(err)})")
        raise DataError(f"{what}: {local}, but {why}. Fix: where there is network run `{call}.save_to_disk('DIR')`, "
                        f"copy DIR here and set `{what}: DIR` (with `{split_key}:` for a DatasetDict); or fix the "
                        f"path if you meant a local file.") from None
    except ValueError as err:
        text = first_line(err)
        if "split" in str(err).lower():
            raise DataError(f"{what}: the hub dataset {name!r} has no split {split!r} ({text}). Fix: set "
                            f"`{split_key}:` to one of its splits.") from None
        raise DataError(f"{what}: the hub dataset {name!r} could not be read: {text}. Check `config:` "
                        f"(now {config!r}).") from None
    except Exception as err:  # DatasetNotFoundError, gated repos, bad revision, ...
        raise DataError(f"{what}: {local}, and reading it from the hub failed: {first_line(err)}. Fix the path or "
                        f"id (a private or gated dataset needs `hf auth login`; check `revision:`).") from None
    return (*_rows(ds), split)


def first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def describe(kind: str, name: str, split: str) -> str:
    """How rows of a dataset source are named in messages and reports: 'folder[train]', 'hub:org/name[test]'."""
    label = f"hub:{name}" if kind == "hub" else name
    return f"{label}[{split}]" if split else label


__all__ = ["SAVED_MARKERS", "describe", "first_line", "is_saved_dataset", "looks_like_hub_id", "read_hub", "read_saved"]
