"""LoRA training steps on random-weight Llama-shaped models: peftlab (fused kernels + chunked loss) vs HF PEFT.

    python benchmarks/gpu_lora.py --shape 1b                # Llama-3.2-1B shape, batch 8 x 2048, bf16, SDPA
    python benchmarks/gpu_lora.py --shape 8b --grad-ckpt    # Llama-3.1-8B shape, gradient checkpointing
    python benchmarks/gpu_lora.py --shape tiny --device cpu --steps 1 --warmup 0 --batch 2 --seq 16   # smoke run

Every setup runs in its own subprocess (its own peak memory, its own compile caches) on the same model shape,
the same random weights (seeded), the same batch and LoRA (r=16, alpha=32, no dropout, q/k/v/o/gate/up/down),
AdamW on the adapter weights (fp32, as both libraries keep them on a bf16 base):
- peftlab: peftlab's LoRA with `peftlab.kernels.enable(model, "auto")` (the fused LoRA linear: Triton on CUDA) and
  `chunked_linear_cross_entropy` on the backbone's last hidden state (no (N, V) logits);
- peft_eager: HF PEFT's LoRA, loss from `model(input_ids, labels=...)`;
- peft_compile: the same under `torch.compile(model)`;
- floor: the frozen base, forward + backward with input gradients only (embedding output requires grad, no adapter),
  HF's loss: what every LoRA step pays at least.
- peftlab_qlora: peftlab's QLoRA (the 7 projections in NF4, double quant, blocksize 64, bf16 compute) with the
  kernels enabled (the fused QLoRA node: Triton dequantisation just before each GEMM) and the chunked loss;
- peft_qlora: HF PEFT's LoRA on bitsandbytes' Linear4bit (NF4, double quant, bf16 compute: BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16)'s
  layers), quantised in memory from the same random weights (the 7 projections replaced by Linear4bit, as
  from_pretrained with that config would after loading; nothing written or downloaded), without
  prepare_model_for_kbit_training (it would switch on gradient checkpointing and fp32 norms); HF's loss.
  Needs bitsandbytes (a failed row with the reason where it is missing).
  With peftlab and peftlab_qlora both run, a "QLoRA / LoRA step ratio" line follows the table (goal <= 1.3).
- peftlab_dora: peftlab's DoRA (DoraConfig, same r, alpha, targets) with the kernels enabled (the fused DoRA node:
  norm without W + s B A, m / n in the base GEMM's epilogue) and the chunked loss;
- peft_dora: HF PEFT's LoraConfig(use_dora=True), HF's loss.
  With peftlab and peftlab_dora both run, a "DoRA / LoRA step ratio" line follows (goal <= 1.15).
Prints tokens/s, peak memory (CUDA: max_memory_allocated; CPU: max RSS), each setup's ratios to peft_eager, and MFU.

MFU = model FLOPs per step / step time / peak FLOP/s, with model FLOPs counted as
    4 N P_frozen        frozen GEMM weights (all projections and the lm_head): 2 N P forward + 2 N P for the
                        input gradient (no weight gradient: the base is frozen, so not the usual 6 N P)
  + 6 N P_lora          adapter weights: forward, input and weight gradients
  + 6 B T^2 d L         causal attention: QK^T and PV forward 2 * 2 B T^2 d / 2 (half the pairs are masked), and
                        twice that backward
N = B T tokens, d hidden size, L layers. Recomputation under gradient checkpointing is not counted (model FLOPs,
not hardware FLOPs). Peak: --peak-tflops, else 989 TFLOP/s dense bf16 for H100/H200 (SXM), else not reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETUPS = ["peftlab", "peft_eager", "peft_compile", "floor", "peftlab_qlora", "peft_qlora", "peftlab_dora", "peft_dora"]
SHAPES = {
    # Llama-3.2-1B: tied embeddings, head_dim 64.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    # Llama-3.1-8B: untied, head_dim 128.
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False),
    # Smoke test: runs on CPU in seconds.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(args.seq, 128), attn_implementation="sdpa",
                      initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(cfg, torch_dtype=getattr(torch, args.dtype),
                                              attn_implementation="sdpa")
    model.requires_grad_(False)
    return model


def model_flops(model, args, n_lora: int) -> float:
    cfg = model.config
    frozen = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Linear")  # incl. lm_head
    frozen -= n_lora  # in case a LoRA Linear was counted (A, B are nn.Linear in both libraries)
    N = args.batch * args.seq
    attn = 6 * args.batch * args.seq ** 2 * cfg.hidden_size * cfg.num_hidden_layers
    return 4 * N * frozen + 6 * N * n_lora + attn


def bnb_4bit(model, args):
    """The model as from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=<dtype>)) would hold it: each
    targeted nn.Linear replaced by bitsandbytes' Linear4bit, quantised from its weight in memory."""
    import torch

    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken install
        raise SystemExit(f"peft_qlora needs bitsandbytes, which cannot be imported ({type(exc).__name__}: {exc}); "
                         "pip install bitsandbytes, or leave peft_qlora out of --setups.") from None
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in TARGETS or type(module) is not torch.nn.Linear:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=getattr(torch, args.dtype), compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=64, compress_statistics=True,
                                     quant_type="nf4", module=q)
        q.bias = module.bias
        model.set_submodule(name, q.to(args.device))  # .to() quantises (Params4bit)
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit layers with its bnb LoRA layer
    return model


def run_setup(args) -> dict:
    import torch
    import torch.nn.functional as F

    model = build_model(args)
    dense_flops = model_flops(model, args, 0)  # before quantisation hides the weights' shapes (qlora setups)
    dev = torch.device(args.device)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    setup = args.worker
    lm_head_weight = model.lm_head.weight
    if setup in ("peftlab", "peftlab_qlora", "peftlab_dora"):
        import peftlab.kernels
        from peftlab import DoraConfig, LoraConfig, QLoraConfig, get_peft_model

        config_cls = QLoraConfig if setup == "peftlab_qlora" else LoraConfig  # QLoRA: NF4, double quant, bs 64
        config_cls = DoraConfig if setup == "peftlab_dora" else config_cls
        wrapped = get_peft_model(model, config_cls(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                   target_modules=TARGETS))
        peftlab.kernels.enable(wrapped, backend=args.backend)
        backbone = model.model

        def loss_fn(ids, labels):
            hidden = backbone(input_ids=ids).last_hidden_state  # (B, T, d)
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts labels[t + 1]
            return peftlab.kernels.chunked_linear_cross_entropy(hidden, lm_head_weight, targets, reduction="mean")
    elif setup in ("peft_eager", "peft_compile", "peft_qlora", "peft_dora"):
        import peft

        if setup == "peft_qlora":
            model = bnb_4bit(model, args)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                             lora_dropout=0.0, target_modules=TARGETS,
                                                             use_dora=setup == "peft_dora"))
        fwd = torch.compile(wrapped) if setup == "peft_compile" else wrapped

        def loss_fn(ids, labels):
            return fwd(input_ids=ids, labels=labels).loss
    elif setup == "floor":
        wrapped = model
        embed = model.get_input_embeddings()
        embed.register_forward_hook(lambda mod, inp, out: out.requires_grad_())  # input grads flow, no weight grads

        def loss_fn(ids, labels):
            return model(input_ids=ids, labels=labels).loss
    else:
        raise SystemExit(f"unknown setup {setup!r}; choose from {SETUPS}")

    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    wrapped.train()

    def step():
        loss = loss_fn(ids, ids)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    step_s = elapsed / args.steps
    return {"setup": setup, "tokens_per_s": args.batch * args.seq / step_s, "step_s": step_s, "peak_gib": peak,
            "loss": float(loss), "trainable": n_lora, "flops": dense_flops + 6 * args.batch * args.seq * n_lora,
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}


def peak_tflops(args, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {SETUPS}")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="peftlab's kernels")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU; default from the GPU's name")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.worker:
        print("RESULT " + json.dumps(run_setup(args)), flush=True)
        return 0

    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    bad = [s for s in setups if s not in SETUPS]
    if bad:
        p.error(f"unknown setup(s) {bad}; choose from {SETUPS}")
    base_cmd = [sys.executable, os.path.abspath(__file__)] + [a for a in (argv if argv is not None else sys.argv[1:])]
    results, failed = [], []
    for setup in setups:
        cmd = base_cmd + ["--worker", setup, "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            failed.append(setup)
            print(f"[{setup}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))

    ref = next((r for r in results if r["setup"] == "peft_eager"), None)
    device = results[0]["device"] if results else args.device
    peak = peak_tflops(args, device)
    print(f"\nshape {args.shape}, {device}, {args.dtype}, batch {args.batch} x {args.seq}, LoRA r={args.rank} on "
          f"{len(TARGETS)} projections, grad-ckpt {'on' if args.grad_ckpt else 'off'}, {args.steps} timed steps")
    print(f"{'setup':<14}{'tokens/s':>12}{'peak GiB':>10}{'x tok/s':>9}{'x mem':>8}{'MFU':>8}{'loss':>9}")
    for r in results:
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
        mem = f"{r['peak_gib'] / ref['peak_gib']:.2f}" if ref else "-"
        mfu = f"{r['flops'] / r['step_s'] / (peak * 1e12):.1%}" if peak else "-"
        print(f"{r['setup']:<14}{r['tokens_per_s']:>12.1f}{r['peak_gib']:>10.2f}{speed:>9}{mem:>8}{mfu:>8}"
              f"{r['loss']:>9.3f}")
    for setup in failed:
        print(f"{setup:<14}  failed (the reason is on stderr above)")
    by_setup = {r["setup"]: r for r in results}
    for qlora, lora, goal in (("peftlab_qlora", "peftlab", " (goal <= 1.3x)"), ("peft_qlora", "peft_eager", "")):
        if qlora in by_setup and lora in by_setup:
            ratio = by_setup[qlora]["step_s"] / by_setup[lora]["step_s"]
            print(f"QLoRA / LoRA step ratio, {qlora} / {lora}: {ratio:.2f}x{goal}")
    for dora, lora, goal in (("peftlab_dora", "peftlab", " (goal <= 1.15x)"), ("peft_dora", "peft_eager", "")):
        if dora in by_setup and lora in by_setup:
            ratio = by_setup[dora]["step_s"] / by_setup[lora]["step_s"]
            print(f"DoRA / LoRA step ratio, {dora} / {lora}: {ratio:.2f}x{goal}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "results": results, "failed": failed}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
