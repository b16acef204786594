"""PPO's prompts: where they come from (ppo.prompts, or a data file's prompt column with a held-out split), how one
is encoded (as the sft task encodes a prompt row), and how a batch of them is padded for generation or scoring."""

from __future__ import annotations

import random

import torch

from ...core.config import ConfigError
from ...data import DataError
from ..sources import resolve_shipped


def load_prompts(run) -> tuple[list[str], list[str], dict]:
    """(train prompts, eval prompts, report) from ppo.prompts / ppo.eval_prompts or the data section's files."""
    ppo, data = run.ppo, run.data
    if ppo.prompts is not None:
        train = list(ppo.prompts)
        evals = list(ppo.eval_prompts) if ppo.eval_prompts is not None else list(train)
        return train, evals, {"prompts": {"train": len(train), "eval": len(evals), "source": "ppo.prompts"}}
    if data is None:
        raise ConfigError("task ppo needs prompts: list them in ppo.prompts, or give data.train_file with a "
                          "'prompt' column.")
    from ...data.load import expand_paths

    data = resolve_shipped(data)
    train = [p for path in expand_paths(data.train_file, "train_file") for p in _prompt_column(path, data)]
    if ppo.eval_prompts is not None:
        evals, eval_from = list(ppo.eval_prompts), "ppo.eval_prompts"
    elif data.eval_file is not None:
        evals = [p for path in expand_paths(data.eval_file, "eval_file") for p in _prompt_column(path, data)]
        eval_from = "eval_file"
    elif data.eval_fraction > 0 and len(train) > 1:
        k = max(1, round(len(train) * data.eval_fraction))
        held = set(random.Random(f"peftlab:eval-carve:{data.seed}").sample(range(len(train)), min(k, len(train) - 1)))
        evals = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
        eval_from = f"{data.eval_fraction:g} of the training prompts, chosen by seed {data.seed}"
    else:
        evals, eval_from = list(train), "the training prompts"
    if data.max_train_rows is not None:
        train = _seeded_subset(train, data.max_train_rows, data.seed, "max-train-rows")
    if data.max_eval_rows is not None:
        evals = _seeded_subset(evals, data.max_eval_rows, data.seed, "max-eval-rows")
    return train, evals, {"prompts": {"train": len(train), "eval": len(evals), "eval_from": eval_from,
                                      "source": data.train_file}}


def _prompt_column(path: str, data) -> list[str]:
    from ...data.load import read_rows

    rows, columns = read_rows(path)
    column = data.columns.get("prompt", "prompt")
    if column not in columns:
        raise DataError(f"{path}: task ppo reads prompts from column {column!r}, which the file does not have "
                        f"(columns: {', '.join(map(repr, columns)) or 'none'}). Map yours with "
                        f"`data: {{columns: {{prompt: <your column>}}}}`, or list prompts in ppo.prompts.")
    out = []
    for number, row in enumerate(rows, 1):
        value = row.get(column)
        if isinstance(value, str) and value.strip():
            out.append(value)
        elif not data.skip_bad_rows:
            raise DataError(f"{path}, row {number}, column {column!r}: a prompt must be a non-empty string; seen "
                            f"{value!r}. Fix the row, or set `skip_bad_rows: true` to skip such rows.")
    if not out:
        raise DataError(f"{path}: no usable prompt in column {column!r} ({len(rows)} rows read).")
    return out


def _seeded_subset(items: list, keep: int, seed: int, purpose: str) -> list:
    if len(items) <= keep:
        return items
    chosen = sorted(random.Random(f"peftlab:{purpose}:{seed}").sample(range(len(items)), keep))
    return [items[i] for i in chosen]


def encode_prompt(tokenizer, text: str, template: str | None, max_length: int) -> list[int]:
    """Token ids of one prompt, formatted as the sft task formats a prompt row (see the `prompts` field)."""
    if template is None and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    else:
        from ...data.encode import PLAIN_PROMPT, _special_edges

        try:
            formatted = (template or PLAIN_PROMPT).format(prompt=text)
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(f"prompt_template {template!r} cannot be filled for a prompt ({type(err).__name__}: "
                            f"{err}); use {{prompt}} and write literal braces as {{{{ and }}}}.") from None
        ids = _special_edges(tokenizer)[0] + list(tokenizer(formatted, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"The prompt {text!r} encodes to no tokens; give a non-empty prompt.")
    return ids[-max_length:]


def pad_rows(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, width): left padding (rows right-aligned) as generation needs, or right
    padding as the reward model was trained on."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask



__all__ = ["encode_prompt", "load_prompts", "pad_rows"]
