"""Adapter folders in HF PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.<tensor>` with the adapter name stripped (PEFT's convention), so
vLLM, PEFT and peftlab read each other's files. Only safetensors are read: a pickle checkpoint
(`adapter_model.bin`) can run arbitrary code when loaded, so it is refused with the command to convert it.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.config import CONFIG_NAME
from .atomic import atomic_write_with

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter folder is missing, unreadable, or does not fit the model it is loaded onto."""


def resolve_adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None,
                        revision: str | None = None) -> str:
    """A local folder holding the adapter files: `model_id` itself, or a hub download of it."""
    path = os.fspath(model_id)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return local
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise AdapterFileError(f"No adapter folder at {local!r}. Pass the folder that holds {CONFIG_NAME}.")
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(path, revision=revision, allow_patterns=[
            f"{subfolder + '/' if subfolder else ''}{n}" for n in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)])
    except Exception as err:  # offline, unknown repo, auth: one clear message
        raise AdapterFileError(
            f"{path!r} is not a local folder and could not be fetched from the Hugging Face Hub ({err}). "
            "Pass a local folder, or check the repo id and your network."
        ) from err
    return os.path.join(root, subfolder) if subfolder else root


def read_config_dict(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        pickle_note = ""
        if os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS_NAME)):  # say now, not after the config is fixed
            pickle_note = " " + _pickle_refusal(folder)
        raise AdapterFileError(f"{folder!r} has no {CONFIG_NAME}; it is not an adapter folder "
                               f"(found: {sorted(os.listdir(folder))[:10]}). Pass the folder that save_pretrained "
                               f"wrote (it holds {CONFIG_NAME} and {WEIGHTS_NAME}).{pickle_note}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err}); the file is damaged.") from err


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return load_file(path)
        except SafetensorError as err:  # truncated or not a safetensors file at all
            raise AdapterFileError(f"{path} is not a readable safetensors file ({err}); it is damaged or "
                                   "incomplete. Save the adapter again with save_pretrained.") from err
    if os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS_NAME)):
        raise AdapterFileError(_pickle_refusal(folder))
    raise AdapterFileError(f"{folder!r} has no {WEIGHTS_NAME} (found: {sorted(os.listdir(folder))[:10]}). "
                           "Pass the folder that save_pretrained wrote.")


def _pickle_refusal(folder: str) -> str:
    pickle_path = os.path.join(folder, PICKLE_WEIGHTS_NAME)
    path = os.path.join(folder, WEIGHTS_NAME)
    return (
        f"{pickle_path} is a pickle file, which can run arbitrary code when loaded; peftlab reads only "
        f"safetensors and did not open it. If you trust its source, convert it once with:\n"
        f"  python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{pickle_path}', weights_only=True), '{path}')\""
    )


def write_weights(folder: str, tensors: dict[str, torch.Tensor]) -> None:
    # Clone to contiguous CPU tensors: safetensors refuses views and tensors that share storage (tied weights).
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_with(os.path.join(folder, WEIGHTS_NAME), lambda tmp: save_file(flat, tmp, metadata={"format": "pt"}))


def load_into(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Copy file tensors into the model's tensors, after checking names and shapes all agree."""
    check_fits(expected, found, source)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(found[key].to(dtype=target.dtype, device=target.device))


def check_fits(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise AdapterFileError naming every missing, unexpected or wrongly shaped tensor; copy nothing."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [(k, tuple(found[k].shape), tuple(expected[k].shape))
             for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the model expects are not in the file: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the file fit no module of the model: {_few(unexpected)}")
    if wrong:
        shown = "; ".join(f"{k}: file {f} vs model {m}" for k, f, m in wrong[:5])
        problems.append(f"{len(wrong)} tensor(s) have other shapes than the model's: {shown}")
    if problems:
        raise AdapterFileError(
            f"The adapter in {source} does not fit this base model. " + ". ".join(problems) +
            ". Check that the base model is the one the adapter was trained on (its adapter_config.json names "
            "it under base_model_name_or_path)."
        )


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
