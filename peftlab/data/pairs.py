"""Preference pairs (tasks reward and dpo): rows, examples and batches.

Row (checked by load.py; our column names, mapped from the file's with `columns:`):
    {"prompt": str, "chosen": str, "rejected": str}   + "margin": float (reward only, when the file has it)
    Each text must be non-empty and chosen != rejected.

Example (encode.py, `encode_rows(rows, "reward" | "dpo", ...)`):
    {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"} (+ "margin")
    Each side is prompt + response encoded exactly as an sft prompt/response row: through the tokenizer's chat
    template when it has one and no prompt_template is set (as a user turn and an assistant turn), else
    prompt_template / "{prompt}\\n" then the response and EOS. Labels are -100 on the prompt and the response's
    token ids elsewhere, so DPO sums log-probabilities over exactly the response's tokens (and the tokens that end
    it: EOS or the template's end of turn). A side longer than max_length loses the start of its prompt first
    (a leading BOS is kept), then, if the response alone is too long, its end.

Batch (`Collator(pad_token_id, "reward" | "dpo")`, i.e. `collate_pairs`), for B pairs:
    input_ids (2B, T), attention_mask (2B, T), labels (2B, T): right-padded; row i < B is pair i's chosen side,
        row B + i its rejected side, so one forward scores both and `chosen_rejected` splits any (2B, ...) result;
    margin (B,) float, when the examples have one.
"""

from __future__ import annotations

import torch

from .config import DataError

IGNORE = -100
SIDES = ("chosen", "rejected")


def encode_pair(encoder, row: dict) -> dict:
    """Encode one checked pair row with encode.py's encoder (its `prompt_response`, the sft path)."""
    out: dict = {}
    for side in SIDES:
        ex = encoder.prompt_response(row["prompt"], row[side], side)
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ex["input_ids"], ex["labels"]
    if "margin" in row:
        out["margin"] = float(row["margin"])
    return out


def example_length(example: dict) -> int:
    """Tokens that decide an example's padded width: its own, or for a pair its longer side."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return max(len(example[f"{side}_input_ids"]) for side in SIDES)


def collate_pairs(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pair examples -> one right-padded batch of 2B rows (see the module docstring)."""
    if not examples:
        raise DataError("collate_pairs: got an empty list of examples; a batch needs at least one pair.")
    missing = [k for k in ("chosen_input_ids", "rejected_input_ids") if k not in examples[0]]
    if missing:
        raise DataError(f"collate_pairs: the examples have no {', '.join(missing)} (keys: {sorted(examples[0])}); "
                        "encode preference rows with encode_rows(rows, 'reward' or 'dpo', ...).")
    margins = ["margin" in ex for ex in examples]
    if any(margins) and not all(margins):
        raise DataError("collate_pairs: some pairs have a margin and some do not; give every row a margin.")
    ids = [ex[f"{side}_input_ids"] for side in SIDES for ex in examples]
    labels = [ex[f"{side}_labels"] for side in SIDES for ex in examples]
    lengths = [len(x) for x in ids]
    T = max(lengths)
    input_ids = torch.full((len(ids), T), int(pad_token_id), dtype=torch.long)
    label_t = torch.full((len(ids), T), IGNORE, dtype=torch.long)
    for b, (x, y) in enumerate(zip(ids, labels)):
        input_ids[b, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        label_t[b, : len(y)] = torch.as_tensor(y, dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": label_t,
             "attention_mask": (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()}
    if margins[0]:
        batch["margin"] = torch.tensor([float(ex["margin"]) for ex in examples], dtype=torch.float32)
    return batch


def chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a (2B, ...) result of a pair batch into (chosen (B, ...), rejected (B, ...))."""
    if values.shape[0] % 2:
        raise ValueError(f"chosen_rejected: a pair batch has an even number of rows (2B); got {values.shape[0]}.")
    half = values.shape[0] // 2
    return values[:half], values[half:]


__all__ = ["SIDES", "chosen_rejected", "collate_pairs", "encode_pair", "example_length"]
