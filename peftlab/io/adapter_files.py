"""Adapter folders in HF PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.<tensor>` with the adapter name stripped (PEFT's convention), so
vLLM, PEFT and peftlab read each other's files. Only safetensors are read: a pickle checkpoint
(`adapter_model.bin`) can run arbitrary code when loaded, so it is refused with the command to convert it.
"""

from __future__ import annotations

import json
import os
import stat

from typing import TYPE_CHECKING

from .atomic import atomic_folder, atomic_write_text, atomic_write_with, holds_cwd, recover_folder
from .names import clip

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported inside the functions that read or write tensors: core's configs import this
# module's names (CONFIG_NAME, read_config_dict) and must not pull torch into a run-config check.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# The adapter config as saved, in the weights file's metadata: a config and weights that were not saved together
# are refused at load (new weights beside an old lora_alpha would load and apply the wrong scaling, silently).
CONFIG_METADATA_KEY = "peftlab_adapter_config"
# Fields that may differ between that copy and adapter_config.json: where the base came from and how the folder is
# loaded, nothing that changes what the weights compute.
UNCHECKED_FIELDS = {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}
MAX_CONFIG_BYTES = 16 << 20  # an adapter_config.json is a few KB; a bigger one is not a config (or is hostile)


class AdapterFileError(ValueError):
    """An adapter folder is missing, unreadable, or does not fit the model it is loaded onto."""


def resolve_adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None,
                        revision: str | None = None) -> str:
    """A local folder holding the adapter files: `model_id` itself, or a hub download of it."""
    path = os.fspath(model_id)
    local = os.path.join(path, subfolder) if subfolder else path
    recover_folder(local)  # a save killed between its two renames (file systems without an atomic exchange)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise AdapterFileError(f"{clip(local, 300)} is a file, not an adapter folder. Pass the folder that holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}.")
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise AdapterFileError(f"No adapter folder at {clip(local, 300)}. Pass the folder that holds {CONFIG_NAME}.")
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


def _check_regular(path: str, what: str) -> None:
    """A present entry that is not a regular file (a folder, a device such as /dev/zero, a pipe) is named as such:
    reading a device would never end, and "no such file" would contradict the listing."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a pipe" if stat.S_ISFIFO(mode) else "not a file")
        raise AdapterFileError(f"{path} is {kind}, not a regular file; {what} must be a file written by "
                               "save_pretrained. Replace it with the saved file (or save the adapter again).")


def read_config_dict(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if os.path.exists(path):
        _check_regular(path, CONFIG_NAME)
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise AdapterFileError(f"{path} has {os.path.getsize(path):,} bytes; an adapter config has a few "
                                   "thousand. It is not an adapter config: save the adapter again.")
    if not os.path.isfile(path):
        pickle_note = ""
        if os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS_NAME)):  # say now, not after the config is fixed
            pickle_note = " " + _pickle_refusal(folder)
        raise AdapterFileError(f"{folder!r} has no {CONFIG_NAME}; it is not an adapter folder "
                               f"(found: {sorted(os.listdir(folder))[:10]}). Pass the folder that save_pretrained "
                               f"wrote (it holds {CONFIG_NAME} and {WEIGHTS_NAME}).{pickle_note}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({clip(str(err), 200)}); the file is damaged.") from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(data).__name__}, not an object; it is not an adapter config.")
    return data


def read_weights(folder: str, allow_non_finite: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors, after checking that they were saved together with the folder's config and that
    every value is finite (`allow_non_finite=True` loads NaN/inf weights anyway, to debug a diverged run)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = os.path.join(folder, WEIGHTS_NAME)
    if os.path.exists(path):
        _check_regular(path, WEIGHTS_NAME)
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as fh:
                metadata = fh.metadata() or {}
        except SafetensorError as err:  # truncated or not a safetensors file at all
            raise AdapterFileError(f"{path} is not a readable safetensors file ({clip(str(err), 200)}); it is damaged or "
                                   "incomplete. Save the adapter again with save_pretrained.") from err
        check_config_matches(folder, metadata)
        if not allow_non_finite:
            check_finite(tensors, path)
        return tensors
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


def check_config_matches(folder: str, metadata: dict[str, str]) -> None:
    """Refuse a folder whose adapter_config.json is not the config its weights were saved with (files from two
    saves, or a config edited by hand in a field that changes the computation). Files without the saved copy
    (written by HF PEFT or an older peftlab) are checked only by shape, against the model the config builds."""
    saved_text = metadata.get(CONFIG_METADATA_KEY)
    if saved_text is None or not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return
    saved, current = json.loads(saved_text), read_config_dict(folder)
    # Every field the weights were saved with must read the same (a field deleted from the file would fall back to
    # its default: a change too). Keys only in the file are left to the config's own checks (unknown PEFT keys).
    differ = sorted(k for k in saved if k not in UNCHECKED_FIELDS and current.get(k, "<absent>") != saved[k])
    if differ:
        shown = "; ".join(f"{k}: config {clip(current.get(k, '<absent>'), 60)} vs weights saved with "
                          f"{clip(saved[k], 60)}" for k in differ[:5])
        raise AdapterFileError(
            f"{os.path.join(folder, CONFIG_NAME)} does not match the config {WEIGHTS_NAME} was saved with "
            f"({shown}); loading it would compute something else than what was trained. The folder mixes two saves "
            "or the config was edited: save the adapter again, or restore the config it was saved with.")


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise AdapterFileError naming the tensors that hold NaN or inf (a diverged training run saved them)."""
    import torch

    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterFileError(
            f"{source}: {len(bad)} tensor(s) hold NaN or inf values ({_few(sorted(bad), 3)}); the run that saved "
            "them diverged (learning rate too high?). Use an earlier checkpoint, or pass allow_non_finite=True to "
            "use them anyway (for debugging).")


def write_adapter_folder(folder: str, config_text: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write adapter_config.json + adapter_model.safetensors as one unit: the folder is replaced whole (see
    atomic_folder), so a reader or a kill at any instant finds the old pair or the new pair, never a mix. Other
    files already in the folder (a tokenizer, a README, other adapters' subfolders) are kept."""
    from safetensors.torch import save_file

    # Clone to contiguous CPU tensors: safetensors refuses views and tensors that share storage (tied weights).
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(json.loads(config_text), sort_keys=True)}
    if holds_cwd(folder):  # save_pretrained("."): the folder cannot be swapped; each file is still replaced whole,
        # and a kill between the two leaves a pair that check_config_matches refuses (never loads as a mix)
        os.makedirs(folder, exist_ok=True)
        atomic_write_with(os.path.join(folder, WEIGHTS_NAME), lambda tmp: save_file(flat, tmp, metadata=metadata))
        atomic_write_text(os.path.join(folder, CONFIG_NAME), config_text)
        return
    with atomic_folder(folder, keep_existing=lambda name: name not in (CONFIG_NAME, WEIGHTS_NAME)) as staging:
        atomic_write_with(os.path.join(staging, WEIGHTS_NAME), lambda tmp: save_file(flat, tmp, metadata=metadata))
        atomic_write_text(os.path.join(staging, CONFIG_NAME), config_text)


def load_into(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Copy file tensors into the model's tensors, after checking names and shapes all agree."""
    import torch

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
