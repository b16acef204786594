"""Serving many adapters on one base: peftlab serve's mixed batches vs swapping adapters vs HF PEFT's static batches.

    nice python benchmarks/serve_load.py                       # shipped SmolLM2, N=16 clients, K = 1, 4, 16
    python benchmarks/serve_load.py --clients 8 --adapters 1 4 --new-tokens 16    # a quicker look

The scenario, the same for every setup: N requests arrive at once (N concurrent clients, one request each), request
i asks for adapter i % K, every request generates exactly --new-tokens tokens (64; end-of-sequence suppressed, so all
setups do the same work) greedily from one of a few prompts of 20-40 tokens. The K adapters are LoRA r=16, alpha=32
on q/k/v/o, random A and B (init_lora_weights=False, seeded), written to a temporary folder by this script.

- serve: `peftlab serve`'s app under uvicorn on 127.0.0.1 (a free port), max_batch N, the real `openai` client in N
  threads, streamed (time to first token = the first chunk's arrival);
- swap: the naive server: one request at a time in arrival order, `set_adapter` to its adapter, `generate`
  (peftlab's PeftModel with the K adapters loaded);
- peft_static: HF PEFT's `generate(adapter_names=[...])`, every request in one left-padded batch (static batching:
  all finish together).
Reports generated tokens/s (all tokens / wall time from the arrival to the last answer), p50/p95 latency and p50 time
to first token (arrival -> first token), per setup and K, and the ratios the issue asks for (K=16 vs K=1 for serve,
serve vs swap at K=16). Loopback only; nothing is downloaded (the shipped model comes from a pip package).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROMPTS = [
    "Write a short review of a movie about a detective who solves crimes with the help of a talking parrot.",
    "Explain in simple words why the sky looks blue during the day and red at sunset.",
    "List three ideas for a weekend trip near the mountains with friends who like hiking and good food.",
    "Summarise the plot of a story where a robot learns to paint and opens a small gallery in an old town.",
]


def make_adapters(model: str, k: int, folder: str) -> list[str]:
    from peftlab import LoraConfig, get_peft_model
    from peftlab.models import load_model

    base = load_model(model)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    paths = []
    for i in range(k):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(base, config)
        path = os.path.join(folder, f"a{i}")
        peft_model.save_pretrained(path)
        base = peft_model.unload()
        paths.append(path)
    return paths


def summary(name: str, k: int, wall: float, tokens: int, latencies: list[float], ttfts: list[float]) -> dict:
    q = statistics.quantiles(latencies, n=20, method="inclusive")  # 5% steps: q[9] p50, q[18] p95
    return {"setup": name, "K": k, "tok_s": tokens / wall, "p50": q[9], "p95": q[18],
            "ttft50": statistics.median(ttfts), "wall": wall}


def run_serve(model, tokenizer, folders, n, new_tokens):
    import openai
    import uvicorn

    from peftlab.serve.api import create_app
    from peftlab.serve.engine import Engine

    engine = Engine(model, tokenizer, max_batch=n)
    for i, folder in enumerate(folders):
        engine.load_adapter(f"a{i}", folder)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "base", []), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="-", max_retries=0,
                           timeout=3600)

    def one(i, start):
        first = None
        for chunk in client.completions.create(model=f"a{i % len(folders)}", prompt=PROMPTS[i % len(PROMPTS)],
                                               max_tokens=new_tokens, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
            if first is None and chunk.choices[0].text:
                first = time.perf_counter() - start
        return time.perf_counter() - start, first

    one(0, time.perf_counter())  # warm-up: first-call costs out of the figures
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda i: one(i, start), range(n)))
        wall = time.perf_counter() - start
    server.should_exit = True
    thread.join()
    return wall, [r[0] for r in results], [r[1] for r in results]


class FirstToken:
    """A logits processor that only records when generate() first asks it (the prefill is done) and leaves the
    scores alone."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def _generate(net, tokenizer, prompts, new_tokens, **kw):
    from transformers import LogitsProcessorList

    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    first = FirstToken()
    with torch.inference_mode():
        net.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                     pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([first]), **kw)
    return first.at


def run_swap(model, tokenizer, folders, n, new_tokens):
    from peftlab import PeftModel

    net = PeftModel.from_pretrained(model, folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        net.load_adapter(folder, f"a{i}")
    net.eval()
    _generate(net, tokenizer, PROMPTS[:1], 2)  # warm-up
    start = time.perf_counter()
    latencies, ttfts = [], []
    for i in range(n):  # arrival order, one at a time
        net.set_adapter(f"a{i % len(folders)}")
        first = _generate(net, tokenizer, [PROMPTS[i % len(PROMPTS)]], new_tokens)
        latencies.append(time.perf_counter() - start)
        ttfts.append(first - start)
    wall = time.perf_counter() - start
    net.unload()
    return wall, latencies, ttfts


def run_peft_static(model, tokenizer, folders, n, new_tokens):
    from peft import PeftModel as HFPeftModel

    net = HFPeftModel.from_pretrained(model, folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        net.load_adapter(folder, adapter_name=f"a{i}")
    net.eval()
    names = [f"a{i % len(folders)}" for i in range(n)]
    _generate(net, tokenizer, PROMPTS[:1], 2, adapter_names=names[:1])  # warm-up
    start = time.perf_counter()
    first = _generate(net, tokenizer, [PROMPTS[i % len(PROMPTS)] for i in range(n)], new_tokens, adapter_names=names)
    wall = time.perf_counter() - start
    net.unload()
    return wall, [wall] * n, [first - start] * n


SETUPS = {"serve": run_serve, "swap": run_swap, "peft_static": run_peft_static}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=16, help="N: concurrent requests (default 16)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16], help="values of K")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for every setup (default 1: on a shared 2-core machine more "
                             "threads only contend)")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    args = parser.parse_args()

    from peftlab.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    print(f"model {args.model}, N={args.clients} requests at once, {args.new_tokens} new tokens each, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(args.model, max(args.adapters), tmp)
        for k in args.adapters:
            for name in args.setups:
                model = load_model(args.model).eval()
                wall, latencies, ttfts = SETUPS[name](model, tokenizer, folders[:k], args.clients, args.new_tokens)
                row = summary(name, k, wall, args.clients * args.new_tokens, latencies, ttfts)
                rows.append(row)
                print(f"  {name:<12} K={k:<3} {row['tok_s']:8.1f} tok/s  p50 {row['p50']:6.2f} s  p95 "
                      f"{row['p95']:6.2f} s  TTFT p50 {row['ttft50']:6.2f} s  (wall {wall:.1f} s)", flush=True)
    print("\n| setup | K | tokens/s | p50 latency (s) | p95 latency (s) | TTFT p50 (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['K']} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['ttft50']:.2f} |")
    by = {(r["setup"], r["K"]): r["tok_s"] for r in rows}
    kmax, kmin = max(args.adapters), min(args.adapters)
    if ("serve", kmax) in by and ("serve", kmin) in by:
        print(f"\nserve K={kmax} / K={kmin} tokens/s: {by[('serve', kmax)] / by[('serve', kmin)]:.2f}x (goal >= 0.85)")
    if ("serve", kmax) in by and ("swap", kmax) in by:
        print(f"serve / swap at K={kmax}: {by[('serve', kmax)] / by[('swap', kmax)]:.2f}x (goal >= 3)")


if __name__ == "__main__":
    main()
