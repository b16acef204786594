"""Peak memory and wall time of loading a 1.1B base, wrapping it with LoRA and taking one training step: peftlab
(fp32 / bf16 / QLoRA) against transformers + HF PEFT (fp32 / bf16 / bitsandbytes 4-bit where it runs).

The checkpoint is a random-weight Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632, 32
heads with 4 key/value heads, vocab 32000, untied head: 1,100,048,384 parameters), written ONCE as fp32 safetensors
(2 GB shards, 4.4 GB in all) to `$PEFTLAB_CACHE/bench/tinyllama-1.1b-random` (default ~/.cache/peftlab/...), tensor
by tensor, so writing it never holds the model either.

Each setup runs in a fresh process (`--setup NAME`), one after another, and reports:
- peak RSS: the process's VmHWM (resident high-water mark, file-backed pages included) at the end, and after the
  load alone;
- load: wall seconds of the load alone; total: load + wrap with LoRA r=16 on every linear layer but the head
  ("all-linear", 154 layers) + one AdamW step on a batch of 1 x 256 random token ids (labels = inputs); step CPU s:
  the CPU seconds (all threads) of that step, steadier than wall time when other jobs share the machine.
The *-pinned setups are peftlab's with glibc's mmap threshold pinned at 1 MiB (PEFTLAB_MMAP_THRESHOLD=1048576,
peftlab.models.loading.pin_mmap_threshold; off by default): less peak memory, more time.
16-bit setups compute under torch.autocast(bf16) as `peftlab train` does; trainable tensors are fp32 in all of them
(HF PEFT's autocast_adapter_dtype does the same for its LoRA weights).

    nice python benchmarks/load_memory.py                     # every setup, then the table
    nice python benchmarks/load_memory.py --only peftlab-bf16  # one setup (its row replaced in the results)
    PYTHONPATH=/path/to/bitsandbytes python benchmarks/load_memory.py   # HF + bitsandbytes 4-bit too
    nice python benchmarks/load_memory.py --phases peftlab-qlora     # where one setup's memory goes

Setups whose library is missing or fails (bitsandbytes without a backend for this machine) are listed as not run,
with the reason. Results go to benchmarks/results/load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5)
SHARD_BYTES = 2 << 30
SETUPS = ["peftlab-fp32", "peftlab-bf16", "peftlab-qlora", "hf-fp32", "hf-bf16", "hf-bnb-4bit",
          "peftlab-fp32-pinned", "peftlab-bf16-pinned", "peftlab-qlora-pinned", "peftlab-bf16-gc", "peftlab-qlora-gc",
          "peftlab-qlora-pinned-gc"]
# *-gc: the same setup with gradient checkpointing (`train.gradient_checkpointing: true`), for the activations' share.
# *-pinned: the same setup with glibc's mmap threshold pinned at 1 MiB (PEFTLAB_MMAP_THRESHOLD=1048576, which
# peftlab.models.loading.pin_mmap_threshold reads when load_model runs), to show what that does to peak memory and to
# the step's time.
SEQ = 256
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "load_memory.json")


def checkpoint_dir() -> str:
    from peftlab.models import cache_root

    return os.path.join(cache_root(), "bench", "tinyllama-1.1b-random")


def write_checkpoint(folder: str) -> None:
    """Random N(0, 0.02) weights (norm weights 1) in fp32 shards, tensor by tensor; skipped when complete."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        return
    os.makedirs(folder, exist_ok=True)
    config = LlamaConfig(**SHAPE)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, os.path.join(folder, name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update(dict.fromkeys(current, name))
            current, size = {}, 0

    total = 0
    for key, meta in skeleton.state_dict().items():
        t = torch.ones(meta.shape) if key.endswith("norm.weight") else torch.randn(meta.shape, generator=g) * 0.02
        if size + t.numel() * 4 > SHARD_BYTES:
            flush()
        current[key] = t
        size += t.numel() * 4
        total += t.numel() * 4
    flush()
    config.save_pretrained(folder)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json.tmp"), "w") as fh:
        json.dump(index, fh)
    os.replace(os.path.join(folder, "model.safetensors.index.json.tmp"),  # last: its presence means complete
               os.path.join(folder, "model.safetensors.index.json"))


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmHWM, VmRSS) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def peak_rss() -> int:
    return status_bytes("VmHWM")


def load(setup: str, folder: str):
    """(model, adapter config kind) for one setup: the load alone."""
    import torch

    setup = setup.removesuffix("-gc")  # gradient checkpointing: switched on after the load (run_setup)
    if setup.startswith("peftlab"):
        from peftlab.core.method import get_method

        if setup.endswith("-pinned"):
            os.environ["PEFTLAB_MMAP_THRESHOLD"] = "1048576"  # read by load_model (pin_mmap_threshold)
            setup = setup.removesuffix("-pinned")
        from peftlab.methods.qlora import QLoraConfig
        from peftlab.models import load_model

        if setup == "peftlab-qlora":
            config = QLoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
            return load_model(folder, dtype="bf16", quantize=get_method("qlora").quantize_at_load(config)), config
        from peftlab import LoraConfig

        return load_model(folder, dtype=setup.split("-")[1]), LoraConfig(r=16, lora_alpha=32,
                                                                         target_modules="all-linear")
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32 if setup == "hf-fp32" else torch.bfloat16}
    if setup == "hf-bnb-4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs), None


def run_setup(setup: str, folder: str, mark=lambda phase: None) -> dict:
    """One setup in this process; `mark(phase)` is called after each phase (load, wrap, forward, backward, step)."""
    import torch

    torch.manual_seed(0)
    mark("imports")
    start = time.perf_counter()
    model, config = load(setup, folder)
    loaded, load_peak = time.perf_counter(), peak_rss()
    mark("load")
    if setup.endswith("-gc"):  # keep only each block's input for backward and recompute the rest
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup.startswith("peftlab"):
        from peftlab import get_peft_model

        model = get_peft_model(model, config)
    else:
        import peft

        if setup == "hf-bnb-4bit":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    wrapped = time.perf_counter()
    mark("wrap")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    sixteen = "fp32" not in setup
    cpu = time.process_time()  # CPU seconds of all the process's threads: steadier than wall time on a busy machine
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sixteen):
        loss = model(input_ids=ids, labels=ids).loss
    mark("forward")
    loss.backward()
    mark("backward")
    optimizer.step()
    end, cpu = time.perf_counter(), time.process_time() - cpu
    mark("step")
    return {"setup": setup, "peak_rss_bytes": peak_rss(), "load_peak_rss_bytes": load_peak,
            "load_s": round(loaded - start, 1), "wrap_s": round(wrapped - loaded, 1), "step_s": round(end - wrapped, 1),
            "step_cpu_s": round(cpu, 1), "total_s": round(end - start, 1),
            "loss": round(float(loss), 4), "trainable_params": sum(p.numel() for p in trainable),
            "trainable_dtypes": sorted({str(p.dtype) for p in trainable})}


def child(setup: str) -> int:
    folder = checkpoint_dir()
    try:
        if setup == "hf-bnb-4bit":
            import bitsandbytes  # noqa: F401  (the import is the check)
        result = run_setup(setup, folder)
    except Exception as err:  # a library that does not run here: reported as a row, not a crash of the table
        result = {"setup": setup, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def phases(setup: str) -> int:
    """Where one setup's memory goes (--phases): after each phase, resident GB now, the peak during the phase, and
    what stays resident after glibc's malloc_trim (the live tensors; the rest was freed memory the heap kept), and
    the phase's CPU seconds. The peak is reset after each phase (/proc/self/clear_refs), and the trims lower later
    phases' figures: a diagnostic, not a row of the table. PEFTLAB_MMAP_THRESHOLD=1048576 (or another size) in
    the environment compares the allocator settings; run such processes side by side for comparable CPU seconds."""
    import ctypes

    def field(name: str) -> float:
        return status_bytes(name) / 1e9

    cpu = [time.process_time()]

    def mark(phase: str) -> None:
        now, peak, seconds = field("VmRSS"), field("VmHWM"), time.process_time() - cpu[0]
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        print(f"{phase:9s} resident {now:.2f} GB, peak during the phase {peak:.2f} GB, live after trim "
              f"{field('VmRSS'):.2f} GB, CPU {seconds:.1f} s", flush=True)
        cpu[0] = time.process_time()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    run_setup(setup, checkpoint_dir(), mark)
    return 0


def table(results: list[dict]) -> str:
    by = {r["setup"]: r for r in results}
    fp32 = by.get("peftlab-fp32", {}).get("peak_rss_bytes")
    twins = {"peftlab-fp32": "hf-fp32", "peftlab-bf16": "hf-bf16", "peftlab-qlora": "hf-bnb-4bit",
             "peftlab-fp32-pinned": "hf-fp32", "peftlab-bf16-pinned": "hf-bf16",
             "peftlab-qlora-pinned": "hf-bnb-4bit"}
    lines = ["| setup | peak RSS (GB) | x peftlab fp32 | x HF same dtype | peak after load (GB) | load s | "
             "step s | step CPU s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['setup']} | not run: {r['error']} | | | | | | |")
            continue
        peak = r["peak_rss_bytes"]
        twin = by.get(twins.get(r["setup"], ""), {}).get("peak_rss_bytes")
        lines.append(f"| {r['setup']} | {peak / 1e9:.2f} | {peak / fp32:.2f} | "
                     f"{f'{peak / twin:.2f}' if twin else ''} | {r.get('load_peak_rss_bytes', 0) / 1e9:.2f} | "
                     f"{r['load_s']} | {r.get('step_s', '')} | {r.get('step_cpu_s', '')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=SETUPS, help=argparse.SUPPRESS)  # internal: one setup, in this process
    parser.add_argument("--only", help="comma-separated setups to run (default: all)")
    parser.add_argument("--phases", choices=SETUPS, help="run one setup here and print its memory after each phase")
    args = parser.parse_args()
    if args.setup:
        return child(args.setup)
    if args.phases:
        return phases(args.phases)
    folder = checkpoint_dir()
    start = time.perf_counter()
    write_checkpoint(folder)
    print(f"checkpoint: {folder} ({time.perf_counter() - start:.0f} s)", flush=True)
    # --only replaces those setups' rows in the stored results and keeps the others (the table shows them all)
    stored = {}
    if args.only and os.path.isfile(RESULTS):
        with open(RESULTS) as fh:
            stored = {r["setup"]: r for r in json.load(fh)["results"]}
    results = []
    for setup in (args.only.split(",") if args.only else SETUPS):
        out = subprocess.run([sys.executable, __file__, "--setup", setup], capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {"setup": setup, "error": f"exit {out.returncode}: "
                                                    f"{' '.join(out.stderr.split()[-30:])}"}
        print(json.dumps(result), flush=True)
        stored[setup] = result
    results = [stored[s] for s in SETUPS if s in stored]
    print(table(results))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump({"command": " ".join(sys.argv), "checkpoint": folder, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
