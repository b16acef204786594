"""`peftlab merge MODEL ADAPTER OUT`: the base model with the adapter merged in, saved as a plain HF folder."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from .errors import CliError

NAME = "merge"
HELP = "merge an adapter into its base model and save the result as a plain transformers folder"
DESCRIPTION = ("Load MODEL, apply ADAPTER, merge its update into the base weights (merge_and_unload) and save the "
               "merged model and tokenizer to OUT: a folder any transformers/vLLM user loads without peftlab. "
               "OUT is written under a temporary name and renamed when complete.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="the base model the adapter was trained on")
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder (PEFT layout)")
    parser.add_argument("out", metavar="OUT", help="folder to create for the merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def base_for_adapter(model: str, adapter: str):
    """The base model with the head the adapter was trained with (a classification head for SEQ_CLS adapters,
    sized from the saved head), plus the tokenizer."""
    import transformers

    from ..core.model import read_config
    from ..io import adapter_files
    from ..models import load_model, load_tokenizer

    folder = adapter_files.resolve_adapter_dir(adapter)
    config = read_config(folder)
    kwargs = {}
    task = getattr(config.task_type, "value", config.task_type)
    auto = {"SEQ_CLS": "AutoModelForSequenceClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
            "TOKEN_CLS": "AutoModelForTokenClassification"}.get(task, "AutoModelForCausalLM")
    if task == "SEQ_CLS":
        weights = adapter_files.read_weights(folder)
        heads = [t for k, t in weights.items() for h in (config.modules_to_save or [])
                 if k.endswith(f".{h}.weight") or k.endswith(f".{h}.out_proj.weight")]
        if heads:
            kwargs = {"num_labels": heads[0].shape[0], "ignore_mismatched_sizes": True}
    tokenizer = load_tokenizer(model)
    base = load_model(model, auto_class=getattr(transformers, auto), **kwargs)
    if tokenizer.pad_token_id is not None:
        base.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, base, folder


def run(args: argparse.Namespace) -> int:
    from ..core.model import PeftModel

    if os.path.exists(args.out) and not args.overwrite:
        raise CliError(f"{args.out!r} exists; pass --overwrite to replace it, or choose another folder.")
    tokenizer, base, folder = base_for_adapter(args.model, args.adapter)
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(args.out)}.tmp-", dir=parent)
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(args.out):
            shutil.rmtree(args.out)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {args.adapter} into {args.model}: saved a plain transformers model to {args.out}")
    return 0
