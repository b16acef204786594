"""`peftlab merge MODEL ADAPTER OUT`: the base model with the adapter merged in, saved as a plain HF folder.

The base is rebuilt as the adapter was trained against it: an adapter trained on a 4-bit base (method qlora) is a plain
LoRA file, but its update belongs to the dequantised NF4 weights W_hat, not to the original weights W (the two differ
by the quantisation error, up to half an NF4 step of 0.08-0.28 x a block's absmax, more than the update changes most
weights). The
method it was trained with comes from the run's run_config.yaml found beside the adapter (or --method); a method that
holds the base in another form (Method.quantize_at_load) gets the base loaded as training loaded it (its dtype, its
quantisation), and the merge folds the update into what the adapter's forward computed with
(AdapterLayer.weight_to_merge_into).

Merge check: before saving, both the adapter model and the merged model run a few rows of text (CHECK_ROWS), and the
largest |logit difference| is printed, absolute and relative to the largest |logit|; above what rounding to the
merged model's dtype explains (ROUNDING_MULTIPLE x its epsilon, relative) a warning says so with the figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .errors import CliError
from .options import add_dtype_argument

NAME = "merge"
HELP = "merge an adapter into its base model and save the result as a plain transformers folder"
DESCRIPTION = ("Load MODEL, apply ADAPTER, merge its update into the base weights (merge_and_unload) and save the "
               "merged model and tokenizer to OUT: a folder any transformers/vLLM user loads without peftlab. "
               "OUT is written under a temporary name and renamed when complete. An adapter trained on a 4-bit base "
               "(qlora) is merged into the dequantised weights it was trained against (the method comes from the "
               "run's run_config.yaml beside ADAPTER, or --method). A merge check is printed: the largest |logit "
               "difference| between the adapter model and the merged model on a few rows of text, with a warning "
               "when it is above what rounding to --dtype explains (16 x its epsilon, relative to the largest "
               "|logit|: fp32 1.9e-6, bf16 0.125).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="the base model the adapter was trained on")
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder (PEFT layout)")
    parser.add_argument("out", metavar="OUT", help="folder to create for the merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_dtype_argument(parser, "fp32", "the merged model is saved in it (default fp32)")
    parser.add_argument("--method", metavar="NAME", default=None,
                        help="the method the adapter was trained with, where its file does not say (a qlora "
                             "adapter's file is a plain LoRA file): merge into the base as that method held it. "
                             "Default: the method in the run_config.yaml of the run that wrote ADAPTER (found "
                             "beside it), else the file's own")


def base_for_adapter(model: str, adapter: str, dtype: str = "fp32", quantize=None):
    """The base model with the head the adapter was trained with (a classification head for SEQ_CLS adapters,
    sized from the saved head), plus the tokenizer. `quantize`: load_model's argument (a method that holds base
    weights quantised, Method.quantize_at_load)."""
    import transformers

    from ..core.model import read_config
    from ..data.templates import add_stop_ids, apply_adapter_template
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
    # The chat template saved with the adapter (data.chat_template) goes with the tokenizer into the merged folder and
    # the GGUF file (export/tokenizer.py writes tokenizer.chat_template from the tokenizer it is given).
    stops = apply_adapter_template(tokenizer, folder, lambda note: print(f"peftlab: {note}"))
    base = load_model(model, auto_class=getattr(transformers, auto), dtype=dtype, quantize=quantize, log=print,
                      **kwargs)
    add_stop_ids(base, stops)  # its end of turn: the merged folder's generation_config.json stops there too
    if tokenizer.pad_token_id is not None:
        base.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, base, folder


@dataclasses.dataclass
class Trained:
    """How the adapter was trained, as far as merging needs it."""

    config: object
    """The adapter config to load the file with: the file's own, or the training method's with the fields the file
    does not carry (e.g. QLoRA's quantisation settings) from the run."""

    method: object
    """The registered Method of `config`."""

    source: str | None = None
    """Where the method came from when not from the file: a run_config.yaml path or "--method NAME"."""

    base_dtype: str | None = None
    """The dtype the run held its base in (RunConfig.base_dtype), when a run config was found."""

    def base_load(self, dtype: str) -> tuple[object | None, str]:
        """(quantize, load dtype): load_model's arguments to give the adapter the base it was trained on, for a
        model meant to compute in `dtype`. A method that holds the base in another form (Method.quantize_at_load:
        QLoRA's NF4) gets it quantised as the run did, from weights in the run's dtype (the codes follow the weights
        they were made from); the caller then casts the model to `dtype` where the two differ."""
        if self.method.quantize_at_load is None:
            return None, dtype
        return self.method.quantize_at_load(self.config), self.base_dtype or dtype


def training_config(folder: str, method_name: str | None = None) -> Trained:
    """The config ADAPTER was trained with (see `Trained.config`). With `method_name`, that method's config class,
    which must be the file's class or a subclass of it (a qlora adapter reads as LoRA; its quantisation fields take
    their defaults, QLoRA's); else the method in the run_config.yaml beside the adapter, with the run's values."""
    from ..core.config import ConfigError
    from ..core.method import get_method, method_for_config
    from ..core.model import read_config
    from ..core.save_load import config_as_trained

    file_config = read_config(folder)
    run = None
    if method_name is not None:
        try:
            method = get_method(method_name)
        except KeyError as err:
            raise CliError(f"--method: {err.args[0]}") from None
        source = f"--method {method_name}"
    else:
        from ..train.config import run_config_beside

        path = run_config_beside(folder)
        if path is None:
            return Trained(file_config, method_for_config(file_config))
        from ..train import load_run_config

        try:
            run = load_run_config(path)
        except ConfigError as err:
            raise CliError(f"{path} (the run that wrote {folder}) could not be read: {err} Fix it, or pass --method "
                           "NAME to say how the adapter was trained.") from None
        method, source = method_for_config(run.method), path
    file_cls, cls = type(file_config), method.config_cls
    if cls is file_cls or not issubclass(cls, file_cls):
        if method_name is not None and cls is not file_cls:
            raise CliError(f"--method {method_name}: its adapters are {cls.__name__} files (peft_type "
                           f"{cls.peft_type!r}); {folder} holds a {file_cls.__name__} adapter (peft_type "
                           f"{file_cls.peft_type!r}). Leave --method out, or give the method that wrote it.")
        # The file names its own method (or the run's method is no refinement of it): the file's config holds all.
        return Trained(file_config, method_for_config(file_config), None, run.base_dtype if run else None)
    # The fields the file cannot carry (e.g. QLoRA's blocksize and double quant): the run's, or (--method) the
    # method's defaults.
    trained = run.method if run is not None else cls(**{f.name: getattr(file_config, f.name)
                                                         for f in dataclasses.fields(file_cls) if f.init})
    return Trained(config_as_trained(file_config, trained), method, source, run.base_dtype if run else None)


CHECK_ROWS = (
    "The quick brown fox jumps over the lazy dog.",
    "Parameter-efficient fine-tuning trains a small update and keeps the base model frozen.",
    "Q: What is the capital of France?\nA: Paris.",
    "I loved this movie: the acting was great, but the ending felt rushed.",
)
"""The rows of text the merge check runs through the adapter model and the merged model."""

CHECK_TOKENS = 32
"""Tokens per check row at most (small models have short position tables)."""

ROUNDING_MULTIPLE = 16
"""The merge check warns when the largest |logit difference| relative to the largest |logit| exceeds this many times
the machine epsilon of the dtype the merged model is held in (`tolerance`): fp32 1.9e-6, fp16 0.016, bf16 0.125.
A correct merge differs from the adapter model by rounding only: every merged weight W + s B A is rounded once to the
dtype (relative error <= eps / 2 per weight), and that error passes through the model like the rounding of the base
itself. Measured on the tiny models of tests/test_merge_check.py: fp32 merges of every mergeable method differ by
up to 7.3e-7 = 6.1 x fp32's epsilon, and a bf16 LoRA merge lies between the fp32 and bf16 tolerances (checked
there). 16 leaves room for deeper models, and still catches an adapter merged into the wrong base in fp32 (QLoRA's
adapter merged into the original rather than the dequantised weights: > 1e-3 relative, 500x the fp32 tolerance). In
bf16 no check can see errors below bf16's own rounding; merge with --dtype fp32 to check (and keep) more."""


def tolerance(dtype: str) -> tuple[float, str]:
    """(relative tolerance of the merge check, its name for the message) for a --dtype choice (auto resolved)."""
    import torch

    from ..models import resolve_dtype

    resolved = resolve_dtype(dtype)[0]
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolved, str(resolved))
    eps = torch.finfo(resolved).eps
    return ROUNDING_MULTIPLE * eps, f"{ROUNDING_MULTIPLE} x {name}'s epsilon {eps:.2g} = {ROUNDING_MULTIPLE * eps:.2g}"


def check_inputs(tokenizer) -> list:
    """Token ids (1, T) of each CHECK_ROWS row, T <= CHECK_TOKENS."""
    rows = [tokenizer(text, return_tensors="pt")["input_ids"][:, :CHECK_TOKENS] for text in CHECK_ROWS]
    return [ids for ids in rows if ids.shape[1] > 0]


def row_logits(model, rows: list) -> list:
    """The fp32 logits of `model` (an adapter model or a plain one) on each row, in eval mode, no gradients."""
    import torch

    config = getattr(model, "config", None)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in rows:
            ids = ids.to(next(model.parameters()).device)
            kwargs = {"decoder_input_ids": ids} if getattr(config, "is_encoder_decoder", False) else {}
            out.append(model(input_ids=ids, **kwargs).logits.float().cpu())
    return out


def logit_difference(before: list, after: list) -> tuple[float, float]:
    """(largest |after - before| over all rows and logits, that divided by the largest |before|)."""
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    scale = max(float(b.abs().max()) for b in before)
    return diff, diff / max(scale, 1e-30)


def report_merge_check(diff: float, relative: float, rows: list, dtype: str) -> None:
    """Print the merge check line, and the warning (stderr) when the difference is large."""
    tokens = sum(int(r.shape[1]) for r in rows)
    print(f"merge check: largest |logit difference| between the adapter model and the merged model on {len(rows)} "
          f"rows ({tokens} tokens): {diff:.3g} ({relative:.2g} of the largest |logit|)")
    limit, limit_text = tolerance(dtype)
    if not relative <= limit:  # NaN warns too
        print(f"peftlab merge: warning: the merged model's logits differ from the adapter model's by up to {diff:.3g} "
              f"({relative:.2g} of the largest |logit|, above {limit_text}, the rounding a correct merge in this dtype "
              "stays within): the merged model does not compute what the adapter model did. Check that MODEL is the "
              "base the adapter was trained on, and --method.", file=sys.stderr)


def save_merged(merged, tokenizer, out: str) -> None:
    """Write the merged model + tokenizer as one unit: OUT holds the old folder or the complete new one at every
    instant (io/atomic.py's atomic_folder), never half of each."""
    from ..io.atomic import atomic_folder, fault_point

    with atomic_folder(out) as staging:
        merged.save_pretrained(staging)
        fault_point("tokenizer files")
        tokenizer.save_pretrained(staging)


def adapter_model_for_merge(model: str, adapter: str, dtype: str = "fp32", method_name: str | None = None):
    """(tokenizer, PeftModel, folder): ADAPTER on MODEL as it was trained (`training_config`), ready to merge, in
    `dtype`. A method that holds the base in another form (Method.quantize_at_load: QLoRA's NF4) gets the base loaded
    and quantised as the run did, in the run's dtype (the codes follow the weights they were made from), and then
    computing in `dtype`."""
    from ..core.model import PeftModel
    from ..io import adapter_files
    from ..models import resolve_dtype

    folder = adapter_files.resolve_adapter_dir(adapter)
    trained = training_config(folder, method_name)
    quantize, load_dtype = trained.base_load(dtype)
    tokenizer, base, folder = base_for_adapter(model, adapter, load_dtype, quantize)
    if load_dtype != dtype:
        base.to(resolve_dtype(dtype)[0])  # quantised layers keep their codes and produce W_hat in this dtype
    if trained.source:
        print(f"peftlab merge: {folder} was trained with method {trained.method.name} ({trained.source}); merging "
              f"into the base as {trained.method.name} held it")
    return tokenizer, PeftModel.from_pretrained(base, folder, config=trained.config), folder


def run(args: argparse.Namespace) -> int:
    if os.path.exists(args.out) and not args.overwrite:
        raise CliError(f"{args.out!r} exists; pass --overwrite to replace it, or choose another folder.")
    dtype = getattr(args, "dtype", None) or "fp32"  # export_cmd calls run() with a Namespace of its own
    tokenizer, model, _ = adapter_model_for_merge(args.model, args.adapter, dtype, getattr(args, "method", None))
    rows = check_inputs(tokenizer)
    before = row_logits(model, rows)
    merged = model.merge_and_unload()
    report_merge_check(*logit_difference(before, row_logits(merged, rows)), rows, dtype)
    save_merged(merged, tokenizer, args.out)
    print(f"merged {args.adapter} into {args.model}: saved a plain transformers model to {args.out}")
    return 0
