"""Base-weight memory and CPU training-step time: fp32 LoRA vs QLoRA (NF4 + double quantisation) on SmolLM2-135M.

Uses the shipped default model (`load_model("smollm2")`, fp32), target_modules="all-linear" (the 210 linear layers of
the 30 blocks; the output head is tied to the input embeddings and left out, as "all-linear" does), LoRA r=16.

Tables:
1. bytes of the targeted base weights, per storage: fp32, bf16, NF4 with fp32 scales, NF4 + double quantisation
   (QLoRA); the last is measured on the quantised model's tensors (packed codes + scale buffers), the others computed.
2. bytes of the whole model (parameters + buffers, each storage once): the fp32 base, LoRA on it, QLoRA.
3. one training step, forward + backward (no optimizer step), batch 2 x 64 tokens of real text: mean and min wall time
   over the timed steps, for LoRA (fp32 base), QLoRA with peftlab's torch kernels (backend="torch") and QLoRA with
   backend="auto" (bitsandbytes' dequantisation kernel where installed; the same numbers either way).
4. the quantisation error at init (B = 0, so each model computes its base) on the batch: next-token loss of the fp32
   model and of QLoRA, relative Frobenius error of the logits, top-1 agreement.

    python benchmarks/qlora_memory.py                  # 1 thread, 2 warm-up + 5 timed steps
    python benchmarks/qlora_memory.py --threads 2 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

TEXT = ("Parameter-efficient fine-tuning trains a small number of extra weights while the pretrained model stays "
        "frozen. QLoRA goes one step further: the frozen weights are stored in four bits, as NormalFloat codes with "
        "one scale per block of sixty-four weights, and dequantised just before each matrix multiplication. The "
        "low-rank adapters on top are kept in full precision and receive all the gradients. ")


def unique_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def batch(tokenizer, rows: int, length: int) -> dict:
    ids = tokenizer(TEXT * 4, return_tensors="pt")["input_ids"][0]
    assert ids.numel() >= rows * length, "TEXT is too short for the batch"
    ids = ids[: rows * length].reshape(rows, length)
    return {"input_ids": ids, "labels": ids}


def step_times(model, inputs, warmup: int, steps: int) -> list[float]:
    model.train()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peftlab import LoraConfig, QLoraConfig, get_peft_model
    from peftlab.methods.qlora import bnb
    from peftlab.methods.qlora.layer import NF4Linear
    from peftlab.kernels.nf4 import nf4_nbytes
    from peftlab.models import load_model, load_tokenizer

    base = load_model("smollm2").eval()
    tokenizer = load_tokenizer("smollm2")
    inputs = batch(tokenizer, args.rows, args.seq_len)
    with torch.no_grad():
        reference = base(**inputs)
    reference_logits = reference.logits
    base_bytes = unique_bytes(base)

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    start = time.perf_counter()
    qlora = get_peft_model(copy.deepcopy(base), QLoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                            target_modules="all-linear", backend="torch"))
    quantise_s = time.perf_counter() - start
    qlora_auto = get_peft_model(copy.deepcopy(base), QLoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                                 target_modules="all-linear", backend="auto"))
    del base

    nf4_layers = [m for m in qlora.modules() if isinstance(m, NF4Linear)]
    n = sum(m.shape.numel() for m in nf4_layers)
    nf4_dq = sum(m.nbytes() for m in nf4_layers)
    nf4_plain = sum(nf4_nbytes(m.shape.numel(), m.blocksize, double_quant=False) for m in nf4_layers)
    print(f"SmolLM2-135M-Instruct, target_modules='all-linear': {len(nf4_layers)} layers, {n:,} base weights; "
          f"LoRA r={args.r}; torch {torch.__version__}, {args.threads} thread(s)")
    print()
    print("| targeted base weights held as        |         bytes | bits/weight | vs fp32 |")
    print("|--------------------------------------|--------------:|------------:|--------:|")
    for label, nbytes in [("fp32", 4 * n), ("bf16", 2 * n), ("NF4, fp32 scales (blocks of 64)", nf4_plain),
                          ("NF4 + double quant (QLoRA, measured)", nf4_dq)]:
        print(f"| {label:<36} | {nbytes:>13,} | {8 * nbytes / n:>11.3f} | {nbytes / (4 * n):>7.3f} |")
    print()
    print("| whole model (parameters + buffers)   |         bytes |  vs base |")
    print("|--------------------------------------|--------------:|---------:|")
    for label, nbytes in [("fp32 base", base_bytes), ("LoRA on the fp32 base", unique_bytes(lora)),
                          ("QLoRA (NF4 + double quant base)", unique_bytes(qlora))]:
        print(f"| {label:<36} | {nbytes:>13,} | {nbytes / base_bytes:>8.3f} |")
    print(f"(quantising the {len(nf4_layers)} layers took {quantise_s:.1f} s; what QLoRA keeps in full precision is "
          "mostly the 49,152 x 576 embedding table, tied to the output head: 113 MB in fp32)")
    print()
    problem = bnb.device_problem("cpu")
    auto_label = "QLoRA, backend='auto' (" + ("bitsandbytes kernels)" if problem is None else "torch: " + problem + ")")
    rows = [("LoRA, fp32 base", lora), ("QLoRA, backend='torch'", qlora), (auto_label, qlora_auto)]
    title = f"forward + backward, batch {args.rows} x {args.seq_len} tokens"
    print(f"| {title:<72} | mean (s) | min (s) | vs LoRA |")
    print(f"|{'-' * 74}|---------:|--------:|--------:|")
    first = None
    for label, model in rows:
        times = step_times(model, inputs, args.warmup, args.steps)
        mean = statistics.mean(times)
        first = first or mean
        print(f"| {label:<72} | {mean:>8.3f} | {min(times):>7.3f} | {mean / first:>7.2f} |")
    print()
    qlora.eval()
    with torch.no_grad():
        out = qlora(**inputs)
        auto_logits = qlora_auto.eval()(input_ids=inputs["input_ids"]).logits
    logits = out.logits
    rel = ((logits - reference_logits).norm() / reference_logits.norm()).item()
    agree = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    print(f"quantisation error at init (B = 0), on the {args.rows * args.seq_len} positions: next-token loss "
          f"{reference.loss.item():.4f} (fp32) -> {out.loss.item():.4f} (NF4), logits relative error {rel:.4f}, top-1 "
          f"agreement with the fp32 model {agree:.3f}; backend 'auto' vs 'torch' logits identical: "
          f"{torch.equal(logits, auto_logits)}")


if __name__ == "__main__":
    main()
