"""Scoring label continuations by log-likelihood under a causal LM.

For a prompt p (token ids p_1..p_P) and a label continuation c (c_1..c_m):
    log P(c | p) = sum_{j=1..m} log softmax(f(p, c_<j))[c_j]
where f(x) is the model's next-token logits after x. `score_continuations` returns the sum and m for every
(prompt, label) pair; the mean (sum / m) is the length-normalised variant.

Two ways, same numbers (tests/test_method_icl.py checks both against a hand-written forward of p + c):
- reuse_prompt=True: one forward over the prompts (left-padded, explicit position ids, logits kept only at the last
  position), which scores every label's first token at once; labels longer than one token then feed c_1..c_{m-1} on
  top of the prompt's key/value cache, repeated once per label. Tokens forwarded per prompt: P + sum_l (m_l - 1),
  and the second pass is skipped entirely when every label is one token (e.g. " positive" / " negative" in SmolLM2's
  vocabulary).
- reuse_prompt=False: one forward per (prompt, label) pair over p + c: L (P + m) tokens per prompt.
With L labels the saving is about L-fold for prompts much longer than the labels. Measured on SmolLM2-135M (fp32,
1 thread of a 2-core CPU shared with other jobs, so the absolute times are slow), 32 Rotten Tomatoes rows, two
one-token labels, batch 8 (`python benchmarks/icl_scoring.py`):
    zero-shot, ~50-token prompts:  reuse 35 s (1,592 tokens forwarded)  vs  one per pair 80 s (3,248 tokens)
    4-shot, ~189-token prompts:    reuse 77 s (6,037 tokens)            vs  one per pair 162 s (12,138 tokens)
i.e. time follows tokens forwarded, and reusing the prompt halves it for two labels.

Left padding: the prompts of a batch end at the same column, so the last logit of every row is its next-token
prediction; pads are masked out of attention and position ids count real tokens only, so a padded row computes what
it computes alone (up to float rounding).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...models.compat import cache_kwarg, output_cache


@dataclass
class ScoreStats:
    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, T), attention_mask (B, T), position_ids (B, T)), padded on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, T - len(s):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


def _keeps_logits(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def score_continuations(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]], *,
                        pad_id: int, batch_size: int = 8, reuse_prompt: bool = True,
                        autocast_dtype: torch.dtype | None = None, stats: ScoreStats | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs (N, L) float64, token counts (N, L)) of continuation l of prompt n. Every prompt has the
    same number L of continuations (one per label), each at least one token; a prompt must not be empty."""
    N = len(prompts)
    if N == 0:
        return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.long)
    L = len(continuations[0])
    for n in range(N):
        if not prompts[n] or len(continuations[n]) != L or any(len(c) == 0 for c in continuations[n]):
            raise ValueError(f"score_continuations: prompt {n} is empty or has continuations of lengths "
                             f"{[len(c) for c in continuations[n]]} (want {L}, each >= 1 token).")
    device = next(model.parameters()).device
    sums = torch.zeros(N, L, dtype=torch.float64)
    counts = torch.tensor([[len(c) for c in conts] for conts in continuations], dtype=torch.long)
    stats = stats if stats is not None else ScoreStats()
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    keep = _keeps_logits(model)
    # Longest prompts first: rows of similar length share a batch (less padding).
    order = sorted(range(N), key=lambda n: -len(prompts[n]))
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for b in range(0, N, batch_size):
            chunk = order[b: b + batch_size]
            if reuse_prompt:
                part = _score_reusing_prompt(model, [prompts[n] for n in chunk], [continuations[n] for n in chunk],
                                             pad_id, device, keep, stats)
            else:
                part = _score_each_pair(model, [prompts[n] for n in chunk], [continuations[n] for n in chunk],
                                        pad_id, device, keep, stats)
            sums[chunk] = part
    model.train(was_training)
    stats.seconds += time.perf_counter() - start
    return sums, counts


def _forward(model, keep: bool, n_logits: int, stats: ScoreStats, **kwargs) -> torch.Tensor:
    if keep:
        kwargs["logits_to_keep"] = n_logits
    out = model(**kwargs)
    stats.forwards += 1
    stats.tokens += int(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:].sum())
    return out


def _score_reusing_prompt(model, prompts, conts, pad_id, device, keep, stats) -> torch.Tensor:
    B, L = len(prompts), len(conts[0])
    ids, mask, pos = (t.to(device) for t in _left_pad(prompts, pad_id))
    longer = any(len(c) > 1 for cs in conts for c in cs)
    out = _forward(model, keep, 1, stats, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=longer)
    last = torch.log_softmax(out.logits[:, -1].float(), dim=-1).double().cpu()  # (B, V): next-token log-probs
    first = torch.tensor([[c[0] for c in cs] for cs in conts])  # (B, L) each label's first token
    sums = last.gather(1, first)
    if not longer:
        return sums
    # Labels of more than one token: feed c_1..c_{m-1} of every (prompt, label) pair after the prompt's cache,
    # repeated L times along the batch (B*L rows), right-padded (a pad after the real tokens changes nothing before
    # it under causal attention; its logits are ignored).
    M = max(len(c) for cs in conts for c in cs) - 1
    inputs = torch.full((B * L, M), int(pad_id), dtype=torch.long)
    targets = torch.zeros((B * L, M), dtype=torch.long)
    valid = torch.zeros((B * L, M), dtype=torch.bool)
    for i, cs in enumerate(conts):
        for j, c in enumerate(cs):
            r, m = i * L + j, len(c) - 1
            if m:
                inputs[r, :m] = torch.as_tensor(c[:-1])
                targets[r, :m] = torch.as_tensor(c[1:])
                valid[r, :m] = True
    cache = output_cache(out)
    cache.batch_repeat_interleave(L)
    prompt_lens = mask.sum(1).repeat_interleave(L)  # (B*L,) real prompt lengths: the next position ids
    mask2 = torch.cat([mask.repeat_interleave(L, 0), torch.ones(B * L, M, dtype=torch.long, device=device)], dim=1)
    pos2 = prompt_lens[:, None] + torch.arange(M, device=device)[None]
    out2 = _forward(model, keep, 0, stats, input_ids=inputs.to(device), attention_mask=mask2, position_ids=pos2,
                    use_cache=False, **{cache_kwarg(model): cache})
    logp = torch.log_softmax(out2.logits.float(), dim=-1).double().cpu()  # (B*L, M, V)
    picked = logp.gather(2, targets[..., None]).squeeze(-1).masked_fill(~valid, 0.0)
    return sums + picked.sum(1).view(B, L)


def _score_each_pair(model, prompts, conts, pad_id, device, keep, stats) -> torch.Tensor:
    B, L = len(prompts), len(conts[0])
    seqs = [list(p) + list(c) for p, cs in zip(prompts, conts) for c in cs]  # (B*L) sequences p + c
    ids, mask, pos = (t.to(device) for t in _left_pad(seqs, pad_id))
    K = max(len(c) for cs in conts for c in cs) + 1  # the last K positions hold every label token's predictor
    out = _forward(model, keep, K, stats, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    logp = torch.log_softmax(out.logits[:, -K:].float(), dim=-1).double().cpu()  # (B*L, K, V)
    sums = torch.zeros(B * L, dtype=torch.float64)
    for i, cs in enumerate(conts):
        for j, c in enumerate(cs):
            r, m = i * L + j, len(c)
            # Left padding: c_t sits at column T - m + t and is predicted by the logits one column earlier, i.e.
            # window index K - m + t - 1 (t = 0..m-1).
            rows = torch.arange(K - m - 1, K - 1)
            sums[r] = logp[r, rows, torch.as_tensor(c)].sum()
    return sums.view(B, L)
