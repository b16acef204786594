"""Export a real adapter to GGUF and check the files with readers that are not peftlab's (docs/export.md).

    peftlab train configs/sft_chat.yaml train.max_steps=30 train.output_dir=out/sft_chat_short
    python benchmarks/export_gguf.py --adapter out/sft_chat_short/adapter

1. `peftlab export MODEL --adapter A --to gguf` at f32, f16, q8_0 (timed), plus the base model at f32 and the
   adapter alone (--adapter-only) for llama.cpp.
2. transformers' GGUF loader reads each merged file; on real text (chatterbot conversations in the chat template,
   POSITIONS tokens) its logits are compared with the merged peftlab model's: largest difference, top-1 agreement.
3. Greedy text: `peftlab generate MODEL --adapter A --prompt P --dtype fp32` (run as a command; its default dtype
   `auto` is bf16 on CPUs with native bf16) against each GGUF loaded by transformers (fp32 compute), with the chat
   template and tokenizer read from the GGUF; and the tokens against the merged peftlab model's.
(llama.cpp itself runs in benchmarks/llamacpp_check.py: the merged and base + adapter-only files, greedy tokens
against peftlab's; docs/export.md.)
Writes a JSON summary (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

PROMPTS = ["What is your name?", "Do you like movies?"]
POSITIONS = 1000


def export(model: str, adapter: str | None, out: str, type_name: str, adapter_only: bool = False) -> float:
    from peftlab.cli.main import main

    args = [model, out, "--to", "gguf", "--type", type_name, "--overwrite"]
    args += ["--adapter", adapter] if adapter else []
    args += ["--adapter-only"] if adapter_only else []
    start = time.perf_counter()
    assert main(["export", *args]) == 0
    return round(time.perf_counter() - start, 1)


def real_text_ids(tokenizer) -> torch.Tensor:
    """(1, POSITIONS) ids: chatterbot conversations rendered with the chat template, concatenated."""
    from peftlab.data.shipped import chatterbot_jsonl

    with tempfile.TemporaryDirectory() as folder:
        rows = [json.loads(line) for line in open(chatterbot_jsonl(os.path.join(folder, "c.jsonl")), encoding="utf-8")]
    ids: list[int] = []
    for row in rows[::37]:  # spread over the corpus' files
        ids += tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        if len(ids) >= POSITIONS:
            break
    return torch.tensor([ids[:POSITIONS]])


def peftlab_generate(model: str, adapter: str, prompt: str, max_new: int) -> str:
    """The text `peftlab generate` prints (greedy, the default)."""
    cmd = [sys.executable, "-m", "peftlab.cli.main", "generate", model, "--adapter", adapter, "--prompt", prompt,
           "--max-new-tokens", str(max_new), "--dtype", "fp32"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def greedy_ids(model, tokenizer, prompt: str, max_new: int) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids) as `peftlab generate` computes them (chat template, greedy)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--out-dir", default="out/export_gguf")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--json", default="benchmarks/results/export_gguf_smollm2.json")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.cli.generate_cmd import load_for_generation

    os.makedirs(args.out_dir, exist_ok=True)
    files = {t: os.path.join(args.out_dir, f"merged-{t}.gguf") for t in ("f32", "f16", "q8_0")}
    seconds = {t: export(args.model, args.adapter, path, t) for t, path in files.items()}
    files["base_f32"] = os.path.join(args.out_dir, "base-f32.gguf")
    files["adapter"] = os.path.join(args.out_dir, "adapter-f32.gguf")
    seconds["base_f32"] = export(args.model, None, files["base_f32"], "f32")
    seconds["adapter"] = export(args.model, args.adapter, files["adapter"], "f32", adapter_only=True)

    tokenizer, peft_model = load_for_generation(args.model, args.adapter, "fp32")
    merged = peft_model.merge_and_unload().eval()
    ids = real_text_ids(tokenizer)
    with torch.no_grad():
        reference = merged(ids).logits[0]
    expected = {p: greedy_ids(merged, tokenizer, p, args.max_new_tokens) for p in PROMPTS}
    summary = {"model": args.model, "adapter": args.adapter, "positions": ids.shape[1], "export_seconds": seconds,
               "sizes_mib": {k: round(os.path.getsize(v) / 2**20, 1) for k, v in files.items()}, "transformers": {}}
    cli_text = {p: peftlab_generate(args.model, args.adapter, p, args.max_new_tokens) for p in PROMPTS}
    for type_name in ("f32", "f16", "q8_0"):
        folder, name = os.path.split(files[type_name])
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
        gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with torch.no_grad():
            logits = model(ids).logits[0]
        texts, same_tokens = {}, []
        for p in PROMPTS:
            prompt_ids, new_ids = greedy_ids(model, gguf_tok, p, args.max_new_tokens)
            texts[p] = gguf_tok.decode(new_ids, skip_special_tokens=True).strip()
            same_tokens.append((prompt_ids, new_ids) == expected[p])
        summary["transformers"][type_name] = {
            "max_abs_logit_diff": round((logits - reference).abs().max().item(), 6),
            "top1_agreement": round((logits.argmax(-1) == reference.argmax(-1)).float().mean().item(), 4),
            "greedy_text_equals_peftlab_generate": [texts[p] == cli_text[p] for p in PROMPTS],
            "prompt_and_greedy_tokens_equal_merged_model": same_tokens,
            "greedy_text": texts,
            "tokenizer_ids_equal": gguf_tok(tokenizer.decode(ids[0]))["input_ids"] == tokenizer(
                tokenizer.decode(ids[0]))["input_ids"],
        }
        print(type_name, json.dumps(summary["transformers"][type_name]), flush=True)
    summary["max_abs_logit_scale"] = round(reference.abs().max().item(), 3)
    summary["peftlab_generate"] = cli_text
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
