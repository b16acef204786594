"""Exporting adapted models for other runtimes: GGUF (llama.cpp, Ollama, LM Studio), merged or adapter-only.

    from peftlab.export import check_adapter, write_model_gguf, write_lora_gguf
    check_adapter(folder, adapter_only=False)               # refuses what a GGUF cannot hold, before any loading
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    write_model_gguf(merged, tokenizer, "out/model.gguf", "q8_0")
    write_lora_gguf(PeftModel.from_pretrained(base, folder), "default", "out/adapter.gguf")

Merged safetensors folders are `peftlab merge` (peftlab/cli/merge_cmd.py). docs/export.md has the runtime matrix
and the checks behind it (tests/test_export.py).
"""

from __future__ import annotations

from .arch import ARCHS, ExportError, arch_spec
from .gguf_file import ADAPTER_TYPE_NAMES, TYPE_NAMES, write_lora_gguf, write_model_gguf

CAUSAL_TASKS = (None, "CAUSAL_LM")


def check_adapter(folder: str, adapter_only: bool) -> None:
    """Raise ExportError if the adapter in `folder` cannot go into a GGUF (merged, or as a llama.cpp LoRA adapter),
    saying why and what to do instead. Reads only adapter_config.json."""
    from ..core.method import method_for_config
    from ..core.model import read_config

    config = read_config(folder)
    method = method_for_config(config)
    task = getattr(config.task_type, "value", config.task_type)
    if task not in CAUSAL_TASKS:
        heads = f" and saves a new head {list(config.modules_to_save)}" if config.modules_to_save else ""
        raise ExportError(
            f"The adapter in {folder} was trained for task_type {task}{heads}: a GGUF holds a causal language model, "
            "which has no place for a classification/other head. Keep the adapter (PEFT layout) or use "
            "peftlab merge for a transformers folder.")
    if not adapter_only:
        if not method.merges:
            raise ExportError(
                f"The adapter in {folder} is {method.name} ({method.summary}): its effect is not a weight update, so it "
                "cannot be merged into a GGUF. Serve it with peftlab/HF PEFT instead.")
        return
    reasons = {
        "use_dora": "DoRA rescales each weight column by a learned magnitude, which llama.cpp adapters cannot express",
        "modules_to_save": f"it saves whole modules {list(config.modules_to_save or [])}, which adapter GGUFs cannot hold",
    }
    why = None
    if config.peft_type != "LORA":
        why = f"it is {method.name} (peft_type {config.peft_type}), not a LoRA pair per layer"
    elif method.updates_base:
        why = f"{method.name} also changes the base weights, which a base GGUF + adapter would not have"
    else:
        why = next((text for key, text in reasons.items() if getattr(config, key, None)), None)
    if why:
        raise ExportError(f"--adapter-only writes llama.cpp LoRA adapters (plain LoRA only): the adapter in {folder} "
                          f"cannot be written, {why}. Export it merged instead (drop --adapter-only).")


__all__ = ["ADAPTER_TYPE_NAMES", "ARCHS", "ExportError", "TYPE_NAMES", "arch_spec", "check_adapter",
           "write_lora_gguf", "write_model_gguf"]
