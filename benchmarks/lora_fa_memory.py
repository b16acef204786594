"""Activation memory kept for backward: LoRA vs LoRA-FA, on a tiny Llama built from a config (nothing downloaded).

LoRA needs each adapted layer's input x (batch, seq, in) for dA = B^T g x^T. LoRA-FA freezes A, so every
gradient needs only u = A x (batch, seq, r) (see peftlab/methods/lora_fa/layer.py). This script counts the bytes
of the tensors autograd saves during one training forward, with torch.autograd.graph.saved_tensors_hooks:

- "saved in adapted layers": tensors saved while an adapter layer's forward runs (its own graph nodes);
- "saved in whole model": every saved tensor of the forward;
both exclude parameters (weights are held by the model anyway) and count each storage once (q, k and v share
their input; a tensor saved twice costs once).

Three rows: LoRA; LoRA with A.requires_grad=False under the ordinary forward (PyTorch's autograd already skips
saving an input whose partner weight is frozen, so this alone gets the saving); LoRA-FA (peftlab's lora_fa, whose
custom autograd Function saves only u by construction).

    python benchmarks/lora_fa_memory.py                         # hidden 256, 4 layers, batch 4 x 256 tokens, r 8
    python benchmarks/lora_fa_memory.py --hidden 512 --seq-len 512 --r 16
"""

from __future__ import annotations

import argparse

import torch


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 8 * 8,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq_len)
    return LlamaForCausalLM(cfg)


def measure(model, ids) -> dict:
    from peftlab.core.layer import AdapterLayer

    state = {"inside": 0}
    in_layers, everywhere = [], []

    def enter(module, args):
        state["inside"] += 1

    def leave(module, args, output):
        state["inside"] -= 1

    hooks = []
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            everywhere.append(t)
            if state["inside"]:
                in_layers.append(t)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for h in hooks:
        h.remove()

    def unique_bytes(ts):
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())

    widest = max((t.shape[-1] for t in in_layers if t.dim() >= 2), default=0)
    return {"layers": unique_bytes(in_layers), "model": unique_bytes(everywhere), "count": len(in_layers),
            "widest": widest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", default="all-linear", help="'all-linear' or a comma-separated list")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from peftlab import LoraConfig, get_peft_model
    from peftlab.core.layer import AdapterLayer
    from peftlab.methods.lora_fa import LoraFaConfig

    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    ids = torch.randint(1, 1000, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for label, config, freeze_a in [
        ("LoRA", LoraConfig(r=args.r, target_modules=targets), False),
        ("LoRA, A frozen (plain autograd)", LoraConfig(r=args.r, target_modules=targets), True),
        ("LoRA-FA (peftlab lora_fa)", LoraFaConfig(r=args.r, target_modules=targets), False),
    ]:
        model = get_peft_model(build(args), config)
        if freeze_a:
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)
        adapted = sum(isinstance(m, AdapterLayer) for m in model.modules())
        rows.append((label, adapted, measure(model, ids)))

    lora_layers, lora_model = rows[0][2]["layers"], rows[0][2]["model"]
    print(f"tiny Llama: hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq_len} tokens, "
          f"r {args.r}, targets {args.targets}, fp32")
    header = (f"| {'method':<32} | {'adapted':>7} | {'saved in adapted layers':>23} | {'vs LoRA':>7} | "
              f"{'widest saved':>12} | {'saved in whole model':>20} | {'vs LoRA':>7} |")
    print(header)
    print("|" + "|".join("-" * (len(c) + 0) for c in header.split("|")[1:-1]) + "|")
    for label, adapted, m in rows:
        print(f"| {label:<32} | {adapted:>7} | {m['layers'] / 2**20:>19.2f} MiB | {m['layers'] / lora_layers:>7.3f} | "
              f"{m['widest']:>12} | {m['model'] / 2**20:>16.2f} MiB | {m['model'] / lora_model:>7.3f} |")
    print("widest saved: the largest last dimension among tensors saved inside adapted layers "
          f"(r = {args.r} means only A x is kept).")



if __name__ == "__main__":
    main()
