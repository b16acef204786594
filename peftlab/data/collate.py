"""Examples -> padded batch tensors, with an attention mask that keeps packed examples apart.

Unpacked batches (right-padded to the longest example):
    input_ids (B, T), attention_mask (B, T) 1 real / 0 pad, labels (B, T) with -100 on pads;
    classify: labels (B,) class ids.
    reward / dpo: 2B rows, the B chosen sides then the B rejected sides (pairs.collate_pairs).

Packed batches (examples carrying position_ids and seq_lens, from `encode_rows` with packing):
    input_ids (B, T), labels (B, T), position_ids (B, T) restarting at 0 per example (0 on pads),
    seq_lens (B, K): the example lengths per row, zero-padded (their sum is the number of real tokens),
    attention_mask (B, 1, T, T): an additive float mask, 0 where query t may attend key s, the dtype's
    minimum elsewhere. Allowed: s <= t within the same example (causal and block-diagonal); a pad attends only
    to itself, so no row is fully masked (a fully masked row would give NaN with an -inf mask).

Why an additive float mask: transformers 5.x passes a 4D attention_mask to the attention function unchanged
(masking_utils._preprocess_mask_arguments returns it as-is). The eager path computes `scores + mask`, so a
boolean mask would be added as 0/1 and silently leak; SDPA accepts a float mask as additive too (and a
float32 mask with a bf16/fp16 query). So the float mask is honoured by both "eager" and "sdpa". Flash
attention kernels take no dense mask at all: a packed batch must not reach them with this mask, and
`check_packed_attention` (or `Collator(..., attn_implementation=...)`) refuses that case.

The mask costs B x T x T x 4 bytes (8 x 2048^2 floats = 128 MiB): fine for adapter training lengths.
"""

from __future__ import annotations

import torch

from .config import PAIR_TASKS, TASKS, DataError
from .pairs import collate_pairs

PACKED_ATTENTION_OK = ("eager", "sdpa")
IGNORE = -100


class Collator:
    """callable(list of examples) -> dict of tensors (see the module docstring for the shapes).

    mask_dtype: dtype of the packed 4D mask (float32 works with fp32/bf16/fp16 models under eager and sdpa).
    attn_implementation: the model's (config._attn_implementation); when given, a packed batch for an
    implementation that ignores a dense 4D mask raises instead of leaking attention across examples.
    """

    def __init__(self, pad_token_id: int | None, task: str, *, mask_dtype: torch.dtype = torch.float32,
                 attn_implementation: str | None = None) -> None:
        if task not in TASKS:
            raise DataError(f"Collator: task {task!r} is not known; use one of: {', '.join(TASKS)}.")
        if pad_token_id is None:
            raise DataError("Collator: the tokenizer has no pad token. Set one, e.g. `tokenizer.pad_token = "
                            "tokenizer.eos_token` (pads are masked out and never trained, so any token works).")
        if not mask_dtype.is_floating_point:
            raise DataError(f"Collator: mask_dtype={mask_dtype} must be a float dtype: the eager attention adds the "
                            f"mask to the scores, so a boolean mask would leak attention across packed examples.")
        self.pad_token_id, self.task = int(pad_token_id), task
        self.mask_dtype, self.attn_implementation = mask_dtype, attn_implementation

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("Collator: got an empty list of examples; a batch needs at least one.")
        if self.task in PAIR_TASKS:
            return collate_pairs(examples, self.pad_token_id)
        packed = ["position_ids" in ex for ex in examples]
        if any(packed) and not all(packed):
            raise DataError("Collator: the batch mixes packed and unpacked examples; encode all rows with the same "
                            "`packing` setting.")
        lengths = [len(ex["input_ids"]) for ex in examples]
        T, B = max(lengths), len(examples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        for b, ex in enumerate(examples):
            input_ids[b, : lengths[b]] = torch.as_tensor(ex["input_ids"], dtype=torch.long)

        if self.task == "classify":
            return {"input_ids": input_ids, "attention_mask": _padding_mask(lengths, T),
                    "labels": torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)}

        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        for b, ex in enumerate(examples):
            labels[b, : lengths[b]] = torch.as_tensor(ex["labels"], dtype=torch.long)
        if not packed[0]:
            return {"input_ids": input_ids, "attention_mask": _padding_mask(lengths, T), "labels": labels}

        if self.attn_implementation is not None:
            check_packed_attention(self.attn_implementation)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        K = max(len(ex["seq_lens"]) for ex in examples)
        seq_lens = torch.zeros((B, K), dtype=torch.long)
        for b, ex in enumerate(examples):
            if sum(ex["seq_lens"]) != lengths[b]:
                raise DataError(f"Collator: packed example {b} has seq_lens summing to {sum(ex['seq_lens'])} but "
                                f"{lengths[b]} tokens; build packed examples with encode_rows / pack.")
            position_ids[b, : lengths[b]] = torch.as_tensor(ex["position_ids"], dtype=torch.long)
            seq_lens[b, : len(ex["seq_lens"])] = torch.as_tensor(ex["seq_lens"], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lens": seq_lens,
                "attention_mask": packed_attention_mask([ex["seq_lens"] for ex in examples], T, self.mask_dtype)}


def _padding_mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()


def packed_attention_mask(seq_lens: list[list[int]], T: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, T, T) additive mask: causal within each example, nothing across examples or to pads."""
    B = len(seq_lens)
    doc = torch.full((B, T), -1, dtype=torch.long)  # which example each position belongs to; -1 = pad
    for b, lens in enumerate(seq_lens):
        doc[b, : sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.as_tensor(lens, dtype=torch.long))
    same = doc[:, :, None] == doc[:, None, :]                    # (B, T query, T key)
    causal = torch.ones(T, T, dtype=torch.bool).tril()          # key position <= query position
    real_key = (doc >= 0)[:, None, :]
    allowed = (same & causal & real_key) | torch.eye(T, dtype=torch.bool)  # a pad query sees only itself
    mask = torch.zeros((B, 1, T, T), dtype=dtype)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def check_packed_attention(model_or_implementation) -> None:
    """Raise unless the model's attention honours the packed 4D mask (eager or sdpa)."""
    impl = model_or_implementation
    if not isinstance(impl, str):
        # The first module with a transformers config: the model itself, or the one inside an adapter wrapper.
        modules = model_or_implementation.modules() if hasattr(model_or_implementation, "modules") else []
        configs = (getattr(m, "config", None) for m in modules)
        impl = next((c._attn_implementation for c in configs if hasattr(c, "_attn_implementation")), None)
    if impl not in PACKED_ATTENTION_OK:
        raise DataError(f"Packed batches need an attention implementation that applies a dense 4D mask "
                        f"({' or '.join(PACKED_ATTENTION_OK)}); this model uses {impl!r}, which would let packed "
                        f"examples attend to each other. Load the model with attn_implementation=\"sdpa\", or set "
                        f"`packing: false`.")


__all__ = ["Collator", "PACKED_ATTENTION_OK", "check_packed_attention", "packed_attention_mask"]
