"""Run peftlab's GGUF exports in llama.cpp itself and compare its greedy tokens with peftlab's (docs/export.md).

    peftlab train configs/sft_chat.yaml train.max_steps=6 train.batch_size=2 data.max_eval_rows=4 \
        data.max_length=64 train.output_dir=/tmp/llx/sft
    # llama.cpp runtime in a scratch venv outside the repo (never a peftlab dependency): the prebuilt CPU wheel
    # llama-cpp-py-sync (CFFI bindings to libllama.so, no compiler needed), or --runtime llama-cpp-python
    python3 -m venv /work/.cache/llamacpp-sync-venv
    /work/.cache/llamacpp-sync-venv/bin/pip install llama-cpp-py-sync numpy
    .venv/bin/python benchmarks/llamacpp_check.py --adapter /tmp/llx/sft/adapter \
        --llamacpp-site /work/.cache/llamacpp-sync-venv/lib/python3.11/site-packages
(its libllama.so needs glibc >= 2.38; on older systems see docs/export.md for the LD_PRELOAD shim used here.)

Files, written with `peftlab export` (benchmarks/export_gguf.py's helper): merged-f32, merged-f16 (adapter merged),
base-f32 + adapter-f32 (--adapter-only), the LoRA applied by llama.cpp at load time (llama_adapter_lora_init +
llama_set_adapters_lora with user scale 1.0; llama.cpp itself multiplies by the file's adapter.lora.alpha / r).
A control run, the base without the adapter, shows the prompts tell adapted from unadapted outputs.
Reference: the peftlab model (base + adapter, unmerged, fp32) with transformers' greedy generate, on the prompt
rendered with the chat template, exactly as `peftlab generate --dtype fp32` does (export_gguf.greedy_ids).
llama.cpp is fed the same prompt ids and decodes greedily by argmax of its own logits (no sampler), stopping at the
model's end-of-sequence ids like generate does. The table: file, prompt, tokens equal, first divergence, and
whether llama.cpp's own tokenizer (read from the GGUF) gives the same prompt ids.
--dry-run only exports and computes the peftlab side (no llama.cpp needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_gguf import PROMPTS, export, greedy_ids  # noqa: E402  (sibling script, not a package)

PROMPTS = [*PROMPTS, "Tell me a joke."]


class PySyncRuntime:
    """llama.cpp through llama-cpp-py-sync (prebuilt libllama.so, CFFI bindings of llama.h).

    Its Llama class loads the model and context; the LoRA adapter and the greedy loop use llama.h directly
    (the class has no LoRA option and samples with top-k/top-p/temperature)."""

    def __init__(self, model_path: str, lora_path: str | None):
        import llama_cpp_py_sync

        self.version = (f"llama-cpp-py-sync {llama_cpp_py_sync.__version__} (llama.cpp "
                        f"{llama_cpp_py_sync.__llama_cpp_tag__}, commit {llama_cpp_py_sync.__llama_cpp_commit__})")
        self.llm = llm = llama_cpp_py_sync.Llama(model_path=model_path, n_ctx=256, n_batch=256, verbose=False)
        if lora_path:
            lib, ffi = llm._lib, llm._ffi
            adapter = lib.llama_adapter_lora_init(llm._model, lora_path.encode())
            if adapter == ffi.NULL:
                raise SystemExit(f"llama.cpp could not load the LoRA GGUF {lora_path} (its log above says why)")
            self.adapters = ffi.new("struct llama_adapter_lora *[1]", [adapter])  # kept alive with the context
            if lib.llama_set_adapters_lora(llm._ctx, self.adapters, 1, ffi.new("float[1]", [1.0])) != 0:
                raise SystemExit(f"llama_set_adapters_lora failed for {lora_path}")

    def greedy(self, prompt_ids: list[int], max_new: int, stop: set[int]) -> list[int]:
        """Argmax of the last position's logits, one llama_decode per new token."""
        import numpy as np

        llm = self.llm
        llm._clear_context_state()  # the previous prompt's KV cache
        n_past = llm._eval_tokens(prompt_ids, 0)
        out: list[int] = []
        while len(out) < max_new and (not out or out[-1] not in stop):
            logits = llm._lib.llama_get_logits_ith(llm._ctx, -1)  # float[n_vocab], last decoded position
            out.append(int(np.frombuffer(llm._ffi.buffer(logits, llm.n_vocab * 4), dtype=np.float32).argmax()))
            n_past = llm._eval_tokens(out[-1:], n_past)
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text, add_special=False, parse_special=True)

    def close(self) -> None:
        self.llm.close()


class LlamaCppPythonRuntime:
    """llama.cpp through llama-cpp-python (compiled on install); its own lora_path option applies the adapter."""

    def __init__(self, model_path: str, lora_path: str | None):
        import llama_cpp

        self.version = f"llama-cpp-python {llama_cpp.__version__}"
        # logits_all: since 0.3.x eval() keeps logits in .scores only then (sampling moved into llama.cpp)
        self.llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, n_batch=256, lora_path=lora_path,
                                   lora_scale=1.0, logits_all=True, verbose=False)

    def greedy(self, prompt_ids: list[int], max_new: int, stop: set[int]) -> list[int]:
        llm = self.llm
        llm.reset()
        llm.eval(prompt_ids)
        out: list[int] = []
        while len(out) < max_new and (not out or out[-1] not in stop):
            out.append(int(llm.scores[llm.n_tokens - 1].argmax()))  # logits of the last evaluated position
            llm.eval(out[-1:])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()


RUNTIMES = {"llama-cpp-py-sync": PySyncRuntime, "llama-cpp-python": LlamaCppPythonRuntime}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--out-dir", default="out/llamacpp_check")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--runtime", choices=RUNTIMES, default="llama-cpp-py-sync")
    parser.add_argument("--llamacpp-site", help="site-packages of the venv holding the runtime (put on sys.path)")
    parser.add_argument("--dry-run", action="store_true", help="export and compute peftlab's tokens only")
    parser.add_argument("--json", default="benchmarks/results/llamacpp_check_smollm2.json")
    args = parser.parse_args()
    if args.llamacpp_site:
        sys.path.append(args.llamacpp_site)  # appended: peftlab's own packages (numpy, torch) win

    from peftlab.cli.generate_cmd import load_for_generation

    os.makedirs(args.out_dir, exist_ok=True)
    path = {name: os.path.join(args.out_dir, f"{name}.gguf") for name in ("merged-f32", "merged-f16", "base-f32",
                                                                         "adapter-f32")}
    export(args.model, args.adapter, path["merged-f32"], "f32")
    export(args.model, args.adapter, path["merged-f16"], "f16")
    export(args.model, None, path["base-f32"], "f32")
    export(args.model, args.adapter, path["adapter-f32"], "f32", adapter_only=True)

    tokenizer, model = load_for_generation(args.model, args.adapter, "fp32")
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos])
    expected = {p: greedy_ids(model, tokenizer, p, args.max_new_tokens) for p in PROMPTS}
    if args.dry_run:
        for p, (prompt_ids, new_ids) in expected.items():
            print(f"peftlab {p!r}: {len(prompt_ids)} prompt ids -> {tokenizer.decode(new_ids)!r}")
        print("dry run: exported", ", ".join(path.values()))
        return

    # The last run is a control: the base without the adapter should NOT reproduce the adapter's tokens (if it
    # does, the prompts cannot tell whether llama.cpp applied the LoRA at all).
    runs = {"merged-f32": (path["merged-f32"], None), "merged-f16": (path["merged-f16"], None),
            "base-f32+adapter-f32": (path["base-f32"], path["adapter-f32"]),
            "base-f32 (control)": (path["base-f32"], None)}
    rows = []
    print(f"{'file':22} {'prompt':22} {'equal':>7} {'first div':>9} {'tok ids':>7}  llama.cpp text")
    for label, (model_path, lora_path) in runs.items():
        llm = RUNTIMES[args.runtime](model_path, lora_path)
        for p, (prompt_ids, want) in expected.items():
            got = llm.greedy(prompt_ids, args.max_new_tokens, stop)
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False)
            row = {"file": label, "prompt": p, "tokens_equal": got == want,
                   "new_tokens": [len(got), len(want)],
                   "first_divergence": first_divergence(got, want),
                   "llamacpp_tokenizer_ids_equal": llm.tokenize(text) == prompt_ids,
                   "llamacpp_text": tokenizer.decode(got, skip_special_tokens=True),
                   "peftlab_text": tokenizer.decode(want, skip_special_tokens=True)}
            rows.append(row)
            print(f"{label:22} {p[:22]:22} {str(row['tokens_equal']):>7} {str(row['first_divergence']):>9} "
                  f"{str(row['llamacpp_tokenizer_ids_equal']):>7}  {row['llamacpp_text']!r}", flush=True)
        llm.close()
    from peftlab.io.atomic import atomic_write_text

    summary = {"model": args.model, "adapter": args.adapter, "max_new_tokens": args.max_new_tokens,
               "runtime": llm.version, "rows": rows}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    atomic_write_text(args.json, json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
