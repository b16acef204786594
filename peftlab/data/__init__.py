"""Local files -> tokenised training examples for the task modes (causal_lm, sft, classify, reward, dpo).

    splits = load_splits(cfg, task)                  # read, check, split: .train / .eval rows, .report
    train = encode_rows(splits.train, task, tokenizer, cfg, splits.label2id)
    collate = Collator(tokenizer.pad_token_id, task)  # list of examples -> dict of padded tensors

load.py reads and checks rows, encode.py tokenises (and packs), collate.py pads and builds attention masks,
pairs.py describes preference pairs (reward, dpo) and collates them, shipped.py turns data shipped in pip
packages (movie reviews, chatterbot corpus) into files we read.
"""

from .collate import PACKED_ATTENTION_OK, Collator, check_packed_attention, packed_attention_mask
from .config import PAIR_TASKS, TASKS, DataConfig, DataError
from .encode import encode_rows, pack
from .load import Splits, load_splits
from .pairs import chosen_rejected, collate_pairs, example_length

__all__ = ["Collator", "DataConfig", "DataError", "PACKED_ATTENTION_OK", "PAIR_TASKS", "Splits", "TASKS",
           "check_packed_attention", "chosen_rejected", "collate_pairs", "encode_rows", "example_length", "load_splits",
           "pack", "packed_attention_mask"]
