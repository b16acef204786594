"""Local files -> tokenised training examples for the task modes (causal_lm, sft, classify, reward, dpo).

    splits = load_splits(cfg, task)                  # read, check, split: .train / .eval rows, .report
    train = encode_rows(splits.train, task, tokenizer, cfg, splits.label2id)
    collate = Collator(tokenizer.pad_token_id, task)  # list of examples -> dict of padded tensors

load.py reads and checks rows, encode.py tokenises (and packs), collate.py pads and builds attention masks,
pairs.py describes preference pairs (reward, dpo) and collates them, shipped.py turns data shipped in pip
packages (movie reviews, chatterbot corpus) into files we read.
"""

import importlib

# Imported on first use (PEP 562): a run config reads data.config (DataConfig, TASKS) before torch is imported, and
# importing this package must not pull in collate.py (torch) for it.
_EXPORTS = {
    **{n: ".collate" for n in ("PACKED_ATTENTION_OK", "Collator", "check_packed_attention", "packed_attention_mask")},
    **{n: ".config" for n in ("PAIR_TASKS", "TASKS", "DataConfig", "DataError")},
    **{n: ".encode" for n in ("encode_rows", "pack")},
    **{n: ".load" for n in ("Splits", "load_splits")},
    **{n: ".pairs" for n in ("chosen_rejected", "collate_pairs", "example_length")},
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


__all__ = ["Collator", "DataConfig", "DataError", "PACKED_ATTENTION_OK", "PAIR_TASKS", "Splits", "TASKS",
           "check_packed_attention", "chosen_rejected", "collate_pairs", "encode_rows", "example_length", "load_splits",
           "pack", "packed_attention_mask"]
