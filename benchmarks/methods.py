"""Every LoRA-family method on the shipped default task, same data and budget, one table.

SmolLM2-135M-Instruct + a new classification head on Rotten Tomatoes reviews (the `peftlab train` default),
adapters on q/k/v/o of the top 10 of 30 layers, the same rows, steps, batch and seed for every method. Each
method runs in its own process (peak RSS is its own). Prints a markdown table and writes it, with a CSV, to
--out. Columns: eval accuracy / macro-F1 / loss after training, trainable parameters (the classification
head, 1,152 parameters, included), peak RSS, training wall time, tokens/s, adapter file size.

    python benchmarks/methods.py                       # all methods, 600 train rows (~1 min each on 2 cores)
    python benchmarks/methods.py --methods lora dora --rows 1000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

# Method options beyond the shared ones. Learning rates follow each paper's advice where it differs from
# LoRA's (VeRA trains only scaling vectors and needs a ~10x larger rate); everything else is shared.
METHODS: dict[str, dict] = {
    "lora": {"name": "lora", "r": 16, "lora_alpha": 32},
    "rslora": {"name": "lora", "r": 16, "lora_alpha": 32, "use_rslora": True},
    "pissa": {"name": "lora", "r": 16, "lora_alpha": 16, "init_lora_weights": "pissa"},
    "olora": {"name": "lora", "r": 16, "lora_alpha": 16, "init_lora_weights": "olora"},
    "dora": {"name": "dora", "r": 16, "lora_alpha": 32},
    "vera": {"name": "vera", "r": 256, "_lr": 4e-3},
    "lora_fa": {"name": "lora_fa", "r": 16, "lora_alpha": 32},
    "lora_plus": {"name": "lora_plus", "r": 16, "lora_alpha": 32, "loraplus_lr_ratio": 16},
    "adalora": {"name": "adalora", "init_r": 16, "target_r": 8, "lora_alpha": 32, "tinit": 5, "tfinal": 10,
                "total_step": None},  # filled with the run's step count
    "delta_lora": {"name": "delta_lora", "r": 16, "lora_alpha": 32, "update_start_step": 10, "delta_lambda": 0.5},
    "qlora": {"name": "qlora", "r": 16, "lora_alpha": 32},
    "lora_drop": {"name": "lora_drop", "r": 16, "lora_alpha": 32},
}
LAYERS = list(range(20, 30))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def run_one(label: str, rows: int, lr: float, out_dir: str) -> dict:
    from peftlab.core.method import registered_methods
    from peftlab.train import Trainer, load_run_config

    options = dict(METHODS[label])
    if options["name"] not in {m.name for m in registered_methods()}:
        return {"method": label, "error": f"method {options['name']!r} is not registered in this checkout"}
    lr = options.pop("_lr", lr)
    batch = 16
    steps = max(1, int(rows * 0.9) // batch)  # eval_fraction 0.1 of the capped rows
    if "total_step" in options:
        options["total_step"] = steps
    options.setdefault("target_modules", TARGETS)
    options.setdefault("layers_to_transform", LAYERS)
    overrides = [f"method={json.dumps(options)}", f"data.max_train_rows={rows}", "data.max_eval_rows=200",
                 f"train.lr={lr}", f"train.batch_size={batch}", "train.progress=false", "train.tensorboard=false",
                 f"train.output_dir={out_dir}", "train.log_every=1000"]
    run = load_run_config(None, overrides)
    trainer = Trainer(run, log=lambda *_: None)
    trainable, total = trainer.peft_model.get_nb_trainable_parameters()
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(result["adapter_dir"], f)) for f in os.listdir(result["adapter_dir"])
               if f.endswith(".safetensors"))
    after = result["after"]
    return {"method": label, "lr": lr, "steps": result["steps"], "accuracy": after["accuracy"],
            "macro_f1": after["macro_f1"], "eval_loss": after["loss"], "trainable_params": trainable,
            "trainable_pct": 100 * trainable / total, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_wall_s": result["train_seconds"], "run_wall_s": wall, "tokens_per_s": result["tokens_per_s"],
            "adapter_mib": size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rows", type=int, default=600, help="training rows (before the 10%% eval carve)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", default="benchmarks/results", help="folder for methods.md and methods.csv")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = run_one(args.one, args.rows, args.lr, tmp)
            except Exception as err:  # reported in the table, the other methods' rows are kept
                row = {"method": args.one, "error": f"{type(err).__name__}: {err}"[:300]}
        print("RESULT " + json.dumps(row))
        return
    rows = []
    for label in args.methods:
        print(f"[{len(rows) + 1}/{len(args.methods)}] {label} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", label, "--rows", str(args.rows), "--lr", str(args.lr)],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        rows.append(json.loads(lines[-1][7:]) if lines else
                    {"method": label, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]})
    header = ("| method | accuracy | macro-F1 | eval loss | trainable params | trainable % | peak RSS MiB | "
              "train s | tokens/s | adapter MiB | lr |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['eval_loss']:.3f} | "
                     f"{r['trainable_params']:,} | {r['trainable_pct']:.3f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['train_wall_s']:.0f} | {r['tokens_per_s']:.0f} | {r['adapter_mib']:.2f} | {r['lr']:g} |")
    table = "\n".join(lines)
    command = "python benchmarks/methods.py " + " ".join(sys.argv[1:])
    print(f"\n{table}\n\n({command.strip()}; {args.rows} rows, {os.cpu_count()} CPU cores)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "methods.md"), "w", encoding="utf-8") as fh:
        fh.write(f"Made with `{command.strip()}` ({args.rows} rows, {os.cpu_count()} CPU cores).\n\n{table}\n")
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(args.out, "methods.csv"), "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
