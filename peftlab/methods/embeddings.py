"""Text embeddings from frozen models, cached on disk: what the two methods that take over a run without gradient
steps share. `features` pools the base model's hidden states into logistic-regression inputs; `icl` embeds texts
with MiniLM to retrieve demonstrations (methods/icl/retrieval.py). Both are methods' concerns (a model's forward,
not reading rows), so this sits in methods/, beside baseline_run.py, and not in data/ (a layer above methods).

Pooling. A frozen model maps token ids (B, T) with attention mask m (B, T) (1 real, 0 pad) to hidden states
h (B, T, H) of one layer. A text's vector is, per `POOLINGS`:
    mean:  sum_t m_t h_t / sum_t m_t                      the average over real tokens
    last:  h_t at t = the last position with m_t = 1      a decoder's summary of the whole text
    cls:   h_t at t = the first position with m_t = 1     BERT's [CLS]; in a decoder (causal attention) the first
                                                          token sees only itself, so every text gets the same vector
                                                          (the features code refuses such constant features)
`layer` picks the hidden states: None is the model's last hidden state (after a final norm where the model has
one); an int indexes transformers' `hidden_states` tuple (0: the embeddings, i: after block i, -1: the last).

Cache. `cached_embeddings` stores one (N, H) float32 tensor per distinct input as `<cache_dir>/<sha256>.safetensors`,
the hash taken over everything the numbers depend on (model files, tokenizer, texts, max_length, pooling, layer,
dtype); the file is written to a temporary name and renamed (peftlab.io.atomic), so a crash never leaves a partial
file that a later run would read. The default folder is `<peftlab cache>/embeddings` ($PEFTLAB_CACHE, else
~/.cache/peftlab). A hit costs reading N x H x 4 bytes (8,530 Rotten Tomatoes reviews x 576 = 20 MB).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.config import ConfigError
from ..io.atomic import atomic_write_with

CACHE_FORMAT = 1  # bump when what a cache file holds changes; old files are then simply not found


# ---- pooling ---------------------------------------------------------------------------------------------------

def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _last_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    T = mask.shape[1]
    # The last real position, whichever side the padding is on: T - 1 - (index of the first 1 in the flipped mask).
    last = T - 1 - mask.flip(1).to(torch.long).argmax(1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _first_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    first = mask.to(torch.long).argmax(1)  # (B,) the first real position
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": _mean_pool,
    "last": _last_pool,
    "cls": _first_pool,
}
"""pooling name -> (hidden (B, T, H), mask (B, T)) -> (B, H); see the module docstring."""


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is not valid; use one of: {', '.join(POOLINGS)}.")
    return POOLINGS[pooling](hidden, mask)


# ---- tokenising and embedding ------------------------------------------------------------------------------------

def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens, the text cut so that the whole fits `max_length` (the specials
    are kept), as the classify task encodes rows."""
    out = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [list(ids) for ids in out]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, T), attention_mask (B, T)), padded on the right with `pad_id`."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@dataclass
class EmbedStats:
    """What an embedding pass cost: texts, real tokens forwarded, seconds (0 tokens when read from the cache)."""

    texts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    cache_hit: bool = False
    cache_file: str | None = None


@torch.no_grad()
def embed_ids(model, seqs: Sequence[Sequence[int]], *, pad_id: int, pooling: str, layer: int | None = None,
              batch_size: int = 16, autocast_dtype: torch.dtype | None = None,
              stats: EmbedStats | None = None) -> torch.Tensor:
    """Pooled hidden states (N, H) float32 of token sequences, in their order. Batches are formed from sequences
    sorted by length, so little of a batch is padding (the result does not depend on the batching beyond float
    rounding: pads are masked out of attention and pooling)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is not valid; use one of: {', '.join(POOLINGS)}.")
    if not seqs:
        raise ValueError("embed_ids: no texts to embed.")
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    start = time.perf_counter()
    tokens = 0
    was_training = model.training
    model.eval()
    for b in range(0, len(order), batch_size):
        chunk = order[b: b + batch_size]
        ids, mask = pad_right([seqs[i] for i in chunk], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        tokens += int(mask.sum())
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            result = model(input_ids=ids, attention_mask=mask, output_hidden_states=layer is not None)
        hidden = _layer_states(result, layer)
        pooled = pool(hidden.float(), mask, pooling).cpu()
        for j, i in enumerate(chunk):
            out[i] = pooled[j]
    model.train(was_training)
    if stats is not None:
        stats.texts, stats.tokens = len(seqs), tokens
        stats.seconds = time.perf_counter() - start
    return torch.stack(out)  # type: ignore[arg-type]


def _layer_states(result, layer: int | None) -> torch.Tensor:
    if layer is None:
        hidden = getattr(result, "last_hidden_state", None)
        if hidden is None:  # a model with a head returns hidden_states only
            raise ConfigError("The model returns no last_hidden_state (it has a task head); load it with "
                              "transformers' AutoModel, or set `layer: -1`.")
        return hidden
    states = result.hidden_states
    if not -len(states) <= layer < len(states):
        raise ConfigError(f"layer={layer} is out of range: this model has {len(states)} hidden-state layers "
                          f"(0 = embeddings ... {len(states) - 1} = last block; negative counts from the end).")
    return states[layer]


# ---- the on-disk cache -------------------------------------------------------------------------------------------

def default_cache_dir() -> str:
    from ..models import cache_root

    return os.path.join(cache_root(), "embeddings")


def model_fingerprint(path: str) -> dict:
    """What identifies a model's weights: the folder and, per weight/config file, its size and modification time
    (so a model saved again at the same path gets new cache entries). A hub id is identified by the id."""
    if not os.path.isdir(path):
        return {"model": path}
    files = {}
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin", ".json", ".pt")):
            st = os.stat(os.path.join(path, name))
            files[name] = [st.st_size, st.st_mtime_ns]
    return {"model": os.path.abspath(path), "files": files}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (a fast tokenizer's JSON: vocabulary, merges, normaliser, ...)
    plus its special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Truncation and padding are call-time state (a call with truncation=True leaves them set), not the tokenizer.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode("utf-8"))
    h.update(type(tokenizer).__name__.encode("utf-8"))
    return h.hexdigest()


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: ["ab", "c"] and ["a", "bc"] differ
        h.update(data)
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cached_embeddings(cache_dir: str | None, parts: dict, compute: Callable[[], torch.Tensor],
                      stats: EmbedStats | None = None) -> torch.Tensor:
    """The (N, H) tensor for `parts` from `<cache_dir>/<cache_key(parts)>.safetensors`, or `compute()` written there
    first. cache_dir None: the default folder; "" (empty): no cache."""
    from safetensors.torch import load_file, save_file

    if cache_dir == "":
        return compute()
    folder = cache_dir or default_cache_dir()
    path = os.path.join(folder, f"{cache_key(parts)}.safetensors")
    if os.path.isfile(path):
        start = time.perf_counter()
        emb = load_file(path)["embeddings"]
        if stats is not None:
            stats.texts, stats.tokens, stats.seconds = emb.shape[0], 0, time.perf_counter() - start
            stats.cache_hit, stats.cache_file = True, path
        return emb
    emb = compute().float().contiguous()
    meta = {"peftlab": json.dumps({k: v for k, v in parts.items() if k != "texts"}, sort_keys=True, default=str)[:4000]}
    atomic_write_with(path, lambda tmp: save_file({"embeddings": emb}, tmp, metadata=meta))
    if stats is not None:
        stats.cache_hit, stats.cache_file = False, path
    return emb


__all__ = ["EmbedStats", "POOLINGS", "cache_key", "cached_embeddings", "default_cache_dir", "embed_ids",
           "model_fingerprint", "pad_right", "pool", "texts_digest", "tokenize_texts", "tokenizer_fingerprint"]
