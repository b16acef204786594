"""What the baselines that take over a `peftlab train` run (`Method.run`: features, icl) share: loading the frozen
base, classification metrics, the method's options, and saving their folders.

A `Method.run` gets its run from the training layer as a context (peftlab.train.method_run.MethodRun): the run
config, the log, the checked classification rows, the base dtype and autocast dtype of the run, and the writer of
the run folder (metrics.jsonl, run_config.yaml, adapter/ with the model card). A method uses only what it is handed
and imports nothing from train/ or data/ (layers above methods/, shared/design.md); it hands its results back up
(the result dict, eval records, the files of its folder, how to load it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Collection

import torch

from ..core.config import CONFIG_NAME, AdapterConfig, ConfigError
from ..io.atomic import atomic_folder


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_frozen_base(name_or_path: str, auto_model: str, dtype: str = "fp32"):
    """(tokenizer, model on `device()` in eval mode, the folder or hub id it came from) for `name_or_path` ("smollm2",
    a folder or a hub id), weights in `dtype` (auto | bf16 | fp16 | fp32: a run passes its model.dtype as resolved,
    RunConfig.base_dtype; the Python API's default is fp32). `auto_model`: transformers' Auto class name; AutoModel
    drops the checkpoint's head (lm_head, classifier), which transformers reports in a table of unexpected weights:
    that is what we ask for, so its log is kept to errors meanwhile. A tokenizer without a pad token pads with EOS
    (padding is masked)."""
    import transformers

    from ..models import load_model, load_tokenizer, resolve_model
    from ..models.dtype import to_stderr

    tokenizer = load_tokenizer(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    before = transformers.logging.get_verbosity()
    if auto_model == "AutoModel":
        transformers.logging.set_verbosity(transformers.logging.ERROR)
    try:
        model = load_model(name_or_path, auto_class=getattr(transformers, auto_model), dtype=dtype, log=to_stderr)
    finally:
        transformers.logging.set_verbosity(before)
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model.to(device()).eval(), resolve_model(name_or_path)


def classification_metrics(preds: list[int], labels: list[int], n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 over `n_classes` classes (scikit-learn; a class never predicted nor present scores 0,
    zero_division=0). The training loop reports classification with this too (train/tasks.py)."""
    from sklearn.metrics import accuracy_score, f1_score

    if not labels:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, labels=list(range(n_classes)), average="macro",
                                       zero_division=0))}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def method_options(config) -> dict:
    """The method's own options as used (its fields beyond the adapter fields every method shares)."""
    shared = {f.name for f in dataclasses.fields(AdapterConfig)} - {"base_model_name_or_path"}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in shared}


def eval_record(metrics: dict, stage: str) -> dict:
    """An eval record of metrics.jsonl as the loop writes it, plus "stage" (which evaluation it is)."""
    return {"step": 0, "split": "eval", **metrics, "stage": stage}


def save_folder(folder: str, write_files: Callable[[str], None], owned: Collection[str]) -> None:
    """A saved features/icl folder, written whole (io/atomic.py's folder swap): a kill leaves the old folder or the
    new one. `write_files(staging)` writes the method's files. Other entries of the old folder (a user's notes) are
    carried over; those in `owned` (every file the format can hold) are not: a k=0 icl save must not keep an older
    save's demonstrations."""
    with atomic_folder(folder, keep_existing=lambda name: name not in owned) as staging:
        write_files(staging)


def read_saved_config(folder: str, config_cls, what: str):
    """The config of a folder a `Method.run` baseline saved (`what`: "features", "icl"), checked to be that method's:
    one reader for every such `load`, with one set of errors."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: it is not a saved {what} folder.")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if data.get("peft_type") != config_cls.peft_type:
        raise ConfigError(f"{path} says peft_type={data.get('peft_type')!r}, not {config_cls.peft_type!r}; load it "
                          f"with the method that wrote it (PeftModel.from_pretrained for weight adapters).")
    return config_cls.from_dict(data, source=path)
