"""Retrieved demonstrations: MiniLM sentence embeddings (cached on disk through methods/embeddings.py) and exact
nearest-neighbour search over them.

MiniLM. We load all-MiniLM-L6-v2 (minilm.py says where it comes from) with transformers' AutoModel and do what
sentence-transformers does for this model: mean pooling over real tokens of the last hidden state, then L2
normalisation, texts cut at 256 tokens.

Search. `CosineIndex` keeps the L2-normalised (N, d) matrix and answers top-k by one matrix product per chunk of
queries: exact (no approximation, unlike HNSW/IVF indexes), O(Q N d) multiply-adds and N d floats of memory. For
8,530 reviews x 384 dims that is 13 MB and ~1.3 GFLOP for 400 queries (milliseconds); an approximate index pays
off only from millions of rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..embeddings import EmbedStats, cached_embeddings, embed_ids, model_fingerprint, texts_digest, tokenize_texts
from .minilm import MINILM_MAX_LENGTH, minilm_path


class MiniLM:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over real tokens, L2-normalised, 384 dims."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path, dtype=torch.float32).to(device).eval()
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str], cache_dir: str | None = None,
               stats: EmbedStats | None = None) -> torch.Tensor:
        """(N, 384) unit vectors, read from / written to the embedding cache."""
        def compute() -> torch.Tensor:
            seqs = tokenize_texts(self.tokenizer, texts, MINILM_MAX_LENGTH)
            emb = embed_ids(self.model, seqs, pad_id=self.tokenizer.pad_token_id, pooling="mean",
                            batch_size=self.batch_size, stats=stats)
            return torch.nn.functional.normalize(emb, dim=-1)

        parts = {"what": "minilm", **model_fingerprint(self.path), "texts": texts_digest(texts), "n": len(texts),
                 "max_length": MINILM_MAX_LENGTH, "pooling": "mean", "normalize": True}
        return cached_embeddings(cache_dir, parts, compute, stats)


# ---- exact cosine search -----------------------------------------------------------------------------------------

class CosineIndex:
    """Exact top-k cosine similarity over the rows of a matrix (see the module docstring for the cost)."""

    def __init__(self, vectors: torch.Tensor, chunk: int = 1024) -> None:
        if vectors.dim() != 2 or vectors.shape[0] == 0:
            raise ValueError(f"CosineIndex needs a non-empty (N, d) matrix, got shape {tuple(vectors.shape)}.")
        self.matrix = torch.nn.functional.normalize(vectors.float(), dim=-1)  # (N, d)
        self.chunk = chunk  # queries per matrix product: (chunk, N) similarities in memory at once

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def search(self, queries: torch.Tensor, k: int, allowed: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities (Q, k), row indices (Q, k)), most similar first. `allowed` (N,) bool: only those rows."""
        n = len(self) if allowed is None else int(allowed.sum())
        if not 0 < k <= n:
            raise ValueError(f"CosineIndex.search: k={k} but the index has {n} searchable rows.")
        q = torch.nn.functional.normalize(queries.float().reshape(-1, self.matrix.shape[1]), dim=-1)
        sims, idx = [], []
        for s in range(0, q.shape[0], self.chunk):
            scores = q[s: s + self.chunk] @ self.matrix.T  # (chunk, N)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            top = scores.topk(k, dim=1)
            sims.append(top.values)
            idx.append(top.indices)
        return torch.cat(sims), torch.cat(idx)


__all__ = ["CosineIndex", "MiniLM"]
