"""`peftlab generate MODEL [--adapter DIR] (--prompt TEXT | --chat)`: text from a model with an adapter."""

from __future__ import annotations

import argparse
import sys

from .options import add_dtype_argument

NAME = "generate"
HELP = "generate text (a prompt, or an interactive chat) with an adapter, streamed"
DESCRIPTION = ("Generate from MODEL (a folder, hub id or smollm2) with an optional adapter folder. --prompt "
               "completes one prompt (rendered with the chat template when the tokenizer has one, unless --raw); "
               "--chat reads your turns from standard input and keeps the conversation.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--adapter", help="adapter folder (PEFT layout) to apply")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt to complete")
    what.add_argument("--chat", action="store_true", help="interactive chat on standard input (empty line ends)")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template to --prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    add_dtype_argument(parser, "auto", "default auto")


def load_for_generation(model: str, adapter: str | None, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM

    from ..core.model import PeftModel
    from ..data.templates import add_stop_ids, apply_adapter_template
    from ..models import load_model, load_tokenizer
    from ..models.dtype import to_stderr

    tokenizer = load_tokenizer(model)
    trained, quantize, load_dtype = None, None, dtype
    if adapter:
        # The adapter on the base as it was trained (the run beside it says the method): a qlora adapter, whose file
        # reads as plain LoRA, gets its 4-bit base back, quantised as training did (merge_cmd.Trained.base_load).
        from ..io import adapter_files
        from ..models import resolve_dtype
        from .merge_cmd import training_config

        trained = training_config(adapter_files.resolve_adapter_dir(adapter))
        quantize, load_dtype = trained.base_load(dtype)
    base = load_model(model, auto_class=AutoModelForCausalLM, dtype=load_dtype, quantize=quantize, log=to_stderr)
    if load_dtype != dtype:
        base.to(resolve_dtype(dtype)[0])  # quantised layers keep their codes and produce W_hat in this dtype
    net = PeftModel.from_pretrained(base, adapter, config=trained.config) if adapter else base
    # The chat template the adapter was trained with (data.chat_template, saved as chat_template.jinja), and its
    # end-of-turn token as one more id to stop at (e.g. <|im_end|> on a base whose eos is <|endoftext|>).
    add_stop_ids(base, apply_adapter_template(tokenizer, adapter,
                                              lambda note: print(f"peftlab generate: {note}", file=sys.stderr)))
    return tokenizer, net.eval()


def _generate(net, tokenizer, ids, args) -> str:
    import torch
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sample = args.temperature > 0
    options = {"do_sample": sample, "max_new_tokens": args.max_new_tokens, "streamer": streamer,
               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    if sample:
        options.update(temperature=args.temperature, top_p=args.top_p)
    with torch.no_grad():
        out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _encode(tokenizer, messages: list[dict] | None, text: str | None):
    if messages is not None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


def run(args: argparse.Namespace) -> int:
    import torch

    torch.manual_seed(args.seed)
    tokenizer, net = load_for_generation(args.model, args.adapter, args.dtype)
    templated = tokenizer.chat_template is not None and not args.raw
    if args.prompt is not None:
        messages = [{"role": "user", "content": args.prompt}] if templated else None
        _generate(net, tokenizer, _encode(tokenizer, messages, args.prompt), args)
        return 0
    history: list[dict] = []
    for line in sys.stdin:
        line = line.strip()
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = _generate(net, tokenizer, _encode(tokenizer, history if templated else None,
                                                  None if templated else line), args)
        history.append({"role": "assistant", "content": reply})
    return 0
