"""`peftlab export MODEL [--adapter DIR] --to gguf|safetensors OUT`: a file another runtime loads."""

from __future__ import annotations

import argparse
import os

from .errors import CliError

NAME = "export"
HELP = "export a model with its adapter for other runtimes: GGUF (merged or adapter-only) or merged safetensors"
DESCRIPTION = (
    "--to gguf: merge ADAPTER into MODEL and write one GGUF file (weights, tokenizer, chat template) that llama.cpp, "
    "Ollama, LM Studio and transformers' GGUF loader read; without --adapter the base model alone. --adapter-only "
    "writes a llama.cpp LoRA adapter GGUF instead (plain LoRA only), used with a base GGUF (llama-cli -m base.gguf "
    "--lora adapter.gguf). --to safetensors: the merged transformers folder, as `peftlab merge`. Architectures: "
    "llama, mistral, qwen2. OUT is written under a temporary name and renamed when complete. docs/export.md.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..export.gguf_file import TYPE_NAMES  # numpy only: `peftlab export --help` imports no torch

    parser.add_argument("model", metavar="MODEL", help="the base model the adapter was trained on")
    parser.add_argument("out", metavar="OUT", help="file to write (.gguf), or folder for --to safetensors")
    parser.add_argument("--adapter", metavar="DIR", help="adapter folder (PEFT layout); omitted: the base model")
    parser.add_argument("--to", choices=("gguf", "safetensors"), required=True, help="output format")
    parser.add_argument("--type", choices=TYPE_NAMES, default=None,
                        help="GGUF tensor type: f32, f16 (default), bf16, q8_0, q4_0; adapter-only: f32 (default), "
                             "f16, bf16. Norms and biases stay f32.")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write the LoRA adapter alone as a llama.cpp adapter GGUF (general.type=adapter)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from .. import export

    if args.to == "safetensors":
        return _merge_folder(args)
    if args.adapter_only and not args.adapter:
        raise CliError("--adapter-only needs --adapter DIR (the LoRA adapter folder to write).")
    return _gguf(args, export)


def _gguf(args, export) -> int:
    from ..io import adapter_files
    from ..models import load_model, load_tokenizer
    from .merge_cmd import adapter_model_for_merge

    if os.path.exists(args.out) and not args.overwrite:  # before loading anything
        raise CliError(f"{args.out!r} exists; pass --overwrite to replace it, or choose another path.")
    if args.adapter:
        export.check_adapter(adapter_files.resolve_adapter_dir(args.adapter), adapter_only=args.adapter_only)
        # The base as the adapter was trained on it (a qlora adapter: the dequantised NF4 weights), as peftlab merge.
        tokenizer, peft_model, _ = adapter_model_for_merge(args.model, args.adapter)
        base = peft_model.get_base_model()
        export.arch_spec(base.config)  # refuse an architecture before merging
        if args.adapter_only and peft_model.method_of("default").quantize_at_load is not None:
            raise CliError(f"{args.adapter} was trained on a quantised base ({peft_model.method_of('default').name}): "
                           "its update belongs to the dequantised weights, not to a base GGUF's original ones. "
                           "Export it merged instead (drop --adapter-only).")
    else:
        tokenizer, base, peft_model = load_tokenizer(args.model), load_model(args.model), None
    if args.adapter_only:
        export.write_lora_gguf(peft_model, "default", args.out, args.type or "f32", overwrite=args.overwrite)
        what = f"the LoRA adapter {args.adapter} as a llama.cpp adapter GGUF"
    else:
        model = peft_model.merge_and_unload() if peft_model is not None else base
        export.write_model_gguf(model, tokenizer, args.out, args.type or "f16", overwrite=args.overwrite,
                                name=os.path.basename(os.path.normpath(args.model)))
        what = f"{args.model}" + (f" with {args.adapter} merged" if args.adapter else "")
    print(f"wrote {what} to {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return 0


def _merge_folder(args) -> int:
    from . import merge_cmd

    if not args.adapter:
        raise CliError("--to safetensors merges an adapter: give --adapter DIR (peftlab merge MODEL ADAPTER OUT).")
    if args.adapter_only or args.type:
        raise CliError("--adapter-only and --type apply to --to gguf; --to safetensors writes the merged folder.")
    parser = argparse.ArgumentParser()  # merge's own options with their defaults
    merge_cmd.add_arguments(parser)
    return merge_cmd.run(parser.parse_args([args.model, args.adapter, args.out] + ["--overwrite"] * args.overwrite))
