"""Local files -> tokenised training examples for three task modes (causal_lm, sft, classify).

    splits = load_splits(cfg, task)                  # read, check, split: .train / .eval rows, .report
    train = encode_rows(splits.train, task, tokenizer, cfg, splits.label2id)
    collate = Collator(tokenizer.pad_token_id, task)  # list of examples -> dict of padded tensors

load.py reads and checks rows, encode.py tokenises (and packs), collate.py pads and builds attention masks,
shipped.py turns data shipped in pip packages (movie reviews, chatterbot corpus) into files we read.
"""

from .collate import PACKED_ATTENTION_OK, Collator, check_packed_attention, packed_attention_mask
from .config import TASKS, DataConfig, DataError
from .encode import encode_rows, pack
from .load import Splits, load_splits

__all__ = ["Collator", "DataConfig", "DataError", "PACKED_ATTENTION_OK", "Splits", "TASKS", "check_packed_attention",
           "encode_rows", "load_splits", "pack", "packed_attention_mask"]
