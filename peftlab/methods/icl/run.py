"""In-context classification end to end: `IclClassifier` (prompts -> label scores -> labels), `load` for a saved
folder, and the `peftlab train` run (`run`, given its run by the training layer)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import torch

from ...core.config import CONFIG_NAME, ConfigError
from ...io.atomic import atomic_write_text
from .. import baseline_run
from ..embeddings import EmbedStats
from .config import IclConfig
from .prompts import PromptBuilder, select_random
from .retrieval import CosineIndex, MiniLM
from .scoring import ScoreStats, score_continuations

POOL_FILE = "demonstrations.jsonl"
LABELS_FILE = "labels.json"
DEFAULT_MAX_LENGTH = 512


class IclClassifier:
    """A causal LM + prompt recipe + the rows demonstrations come from: text -> label, by label log-likelihood."""

    def __init__(self, config: IclConfig, labels: list[str], model, tokenizer,
                 pool: Sequence[tuple[str, str]] = (), autocast_dtype: torch.dtype | None = None) -> None:
        self.config, self.labels, self.model, self.tokenizer = config, list(labels), model, tokenizer
        self.pool = [(str(t), str(y)) for t, y in pool]
        unknown = sorted({y for _, y in self.pool} - set(self.labels))
        if unknown:
            raise ConfigError(f"demonstration rows have labels {unknown} outside the label set {self.labels}.")
        if config.k > 0 and not self.pool:
            raise ConfigError(f"icl k={config.k} needs training rows to draw demonstrations from; none were given.")
        self.builder = PromptBuilder(config, self.labels, tokenizer, max_length=config.max_length or DEFAULT_MAX_LENGTH)
        self.autocast_dtype = autocast_dtype
        self.seed = config.seed if config.seed is not None else 0
        self._retriever: tuple[MiniLM, CosineIndex] | None = None
        self.embed_stats = EmbedStats()

    # ---- demonstrations --------------------------------------------------------------------------------------------

    def retriever(self) -> tuple[MiniLM, CosineIndex]:
        """MiniLM and the exact cosine index over the pool's embeddings (computed once, cached on disk)."""
        if self._retriever is None:
            encoder = MiniLM(device=baseline_run.device())
            vectors = encoder.encode([t for t, _ in self.pool], cache_dir=self.config.cache_dir, stats=self.embed_stats)
            self._retriever = (encoder, CosineIndex(vectors))
        return self._retriever

    def demonstrations(self, texts: Sequence[str], k: int | None = None) -> list[list[tuple[str, str]]]:
        """The demonstrations of each query, in prompt order."""
        k = self.config.k if k is None else k
        if k == 0:
            return [[] for _ in texts]
        if self.config.demonstrations == "random":
            return [select_random(self.pool, self.labels, k, self.config.balanced, self.seed, t) for t in texts]
        if k > len(self.pool):
            raise ConfigError(f"icl k={k} retrieved demonstrations, but only {len(self.pool)} training rows; lower k.")
        encoder, index = self.retriever()
        queries = encoder.encode(list(texts), cache_dir="")  # queries are scored once: not worth a cache file
        _, idx = index.search(queries, k)  # (Q, k) most similar first
        return [[self.pool[i] for i in reversed(row)] for row in idx.tolist()]  # most similar last, next to the query

    # ---- scoring ---------------------------------------------------------------------------------------------------

    def prompts(self, texts: Sequence[str], k: int | None = None) -> list[tuple[str, list[str]]]:
        """(prompt text, continuation texts) per query, as they are scored."""
        return [self.builder.prompt(t, d) for t, d in zip(texts, self.demonstrations(texts, k))]

    def label_scores(self, texts: Sequence[str], k: int | None = None, stats: ScoreStats | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of label-token log-probs (N, L), label token counts (N, L)), columns in `labels` order."""
        encoded = [self.builder.encode(t, d) for t, d in zip(texts, self.demonstrations(texts, k))]
        self._check_lengths(encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return score_continuations(self.model, [e[0] for e in encoded], [e[1] for e in encoded], pad_id=pad,
                                   batch_size=self.config.batch_size, reuse_prompt=self.config.reuse_prompt,
                                   autocast_dtype=self.autocast_dtype, stats=stats)

    def _check_lengths(self, encoded) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if not limit:
            return
        longest = max(len(p) + max(len(c) for c in cs) for p, cs in encoded)
        if longest > limit:
            raise ConfigError(f"An icl prompt plus label is {longest} tokens, more than the model's "
                              f"{limit} positions (k={self.config.k}, texts cut at {self.builder.max_length} tokens). "
                              f"Lower k, or max_length (method.max_length or data.max_length).")

    def scores(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return sums / counts if self.config.length_normalize else sums

    def predict(self, texts: Sequence[str]) -> list[str]:
        sums, counts = self.label_scores(texts)
        return [self.labels[i] for i in self.scores(sums, counts).argmax(1).tolist()]

    def evaluate(self, texts: Sequence[str], labels: Sequence[str], k: int | None = None,
                 stats: ScoreStats | None = None) -> tuple[dict, torch.Tensor]:
        """({loss, accuracy, macro_f1} as the training loop reports them, the scores (N, L)). loss: mean over rows of
        -log softmax(scores)[true label], the label choice's cross-entropy."""
        sums, counts = self.label_scores(texts, k, stats)
        scores = self.scores(sums, counts)
        y = torch.tensor([self.labels.index(lab) for lab in labels])
        loss = float(-torch.log_softmax(scores, dim=1)[torch.arange(len(y)), y].mean())
        metrics = baseline_run.classification_metrics(scores.argmax(1).tolist(), y.tolist(), len(self.labels))
        return {"loss": loss, **metrics}, scores

    # ---- files -----------------------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str) -> None:
        """adapter_config.json (peft_type ICL), labels.json and, when k > 0, demonstrations.jsonl (the rows
        demonstrations are drawn from), as one folder."""
        baseline_run.save_folder(folder, self.write_files, (CONFIG_NAME, LABELS_FILE, POOL_FILE))

    def write_files(self, folder: str) -> None:
        self.config.save_pretrained(folder)
        atomic_write_text(os.path.join(folder, LABELS_FILE), json.dumps(self.labels, indent=2) + "\n")
        if self.config.k > 0:
            lines = "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in self.pool)
            atomic_write_text(os.path.join(folder, POOL_FILE), lines)


def load(folder: str, model=None, tokenizer=None) -> IclClassifier:
    """A saved icl folder as a classifier; the base model named in adapter_config.json is loaded unless `model` and
    `tokenizer` are given."""
    config = baseline_run.read_saved_config(folder, IclConfig, "icl")
    with open(os.path.join(folder, LABELS_FILE), encoding="utf-8") as fh:
        labels = json.load(fh)
    pool = []
    if config.k > 0:
        with open(os.path.join(folder, POOL_FILE), encoding="utf-8") as fh:
            pool = [(r["text"], r["label"]) for r in map(json.loads, fh)]
    if model is None or tokenizer is None:
        if not config.base_model_name_or_path:
            raise ConfigError(f"{os.path.join(folder, CONFIG_NAME)} names no base model (base_model_name_or_path); "
                              "pass model= and tokenizer=.")
        tokenizer, model, _ = baseline_run.load_frozen_base(config.base_model_name_or_path,
                                                            "AutoModelForCausalLM")
    return IclClassifier(config, labels, model, tokenizer, pool)


def run(ctx) -> dict:
    """`peftlab train` with method: icl (Method.run; `ctx`: the run, peftlab.train.method_run.MethodRun): score every
    eval row k-shot (and zero-shot as `before` when k > 0 and zero_shot_baseline) with the base in the run's dtype,
    hand the results to the run folder's writer."""
    run_config, log = ctx.run, ctx.log
    splits = ctx.classify_splits("icl")
    config = dataclasses.replace(run_config.method, base_model_name_or_path=run_config.model,
                                 max_length=run_config.method.max_length or run_config.data.max_length,
                                 seed=run_config.method.seed if run_config.method.seed is not None
                                 else run_config.train.seed)
    tokenizer, model, _ = baseline_run.load_frozen_base(run_config.model, "AutoModelForCausalLM", ctx.base_dtype)
    clf = IclClassifier(config, splits.labels, model, tokenizer, [(r["text"], r["label"]) for r in splits.train],
                        autocast_dtype=ctx.autocast_dtype)
    texts, gold = [r["text"] for r in splits.eval], [r["label"] for r in splits.eval]
    start = time.perf_counter()
    if config.k > 0 and config.demonstrations == "retrieved":
        clf.retriever()  # embeds the training rows (or reads them from the cache): the only "training" there is
    prepare_seconds = time.perf_counter() - start
    records, before, stats = [], None, ScoreStats()
    if config.k > 0 and config.zero_shot_baseline:
        before, _ = clf.evaluate(texts, gold, k=0, stats=stats)
        records.append(baseline_run.eval_record(before, "zero_shot"))
        log(f"icl: zero-shot accuracy {before['accuracy']:.4f}, macro-F1 {before['macro_f1']:.4f}")
    after, _ = clf.evaluate(texts, gold, stats=stats)
    records.append(baseline_run.eval_record(after, f"{config.k}_shot"))
    log(f"icl: {config.k}-shot accuracy {after['accuracy']:.4f}, macro-F1 {after['macro_f1']:.4f} "
        f"({stats.tokens:,} tokens in {stats.seconds:.1f} s)")

    adapter_dir = ctx.adapter_dir
    example_text, example_conts = clf.prompts(texts[:1])[0]
    builder = clf.builder
    note = (f"## In-context learning\n\n{config.k}-shot ({config.demonstrations} demonstrations"
            f"{', k per label' if config.balanced else ''}; seed {config.seed}) over {len(texts):,} eval rows, "
            f"{len(clf.pool):,} training rows to draw from. Each label is scored by the "
            f"{'mean' if config.length_normalize else 'sum'} of its tokens' log-probabilities after the prompt "
            f"({'prompt cache shared by the labels' if config.reuse_prompt else 'one forward per prompt and label'}): "
            f"{stats.tokens:,} tokens forwarded in {stats.seconds:.1f} s. Texts cut at {builder.max_length} tokens: "
            f"{builder.truncated} cuts. Label words: {dict(zip(clf.labels, builder.words))}.\n\n"
            f"The first eval row's prompt (continuations {example_conts}):\n\n```text\n{example_text}\n```")
    result = {"before": before, "after": after, "steps": 0, "train_seconds": prepare_seconds,
              "tokens_per_s": stats.tokens / max(stats.seconds, 1e-9), "stopped_early": False,
              "adapter_dir": adapter_dir, "data": splits.report, "method_notes": [note],
              "trainable_params": 0, "all_params": baseline_run.count_params(model),
              "before_label": "zero-shot" if before else "before", "after_label": f"{config.k}-shot",
              "eval_seconds": stats.seconds}
    usage = (f"from peftlab.methods.icl import load\nclf = load({adapter_dir!r})  # loads {run_config.model}\n"
             f"clf.predict([\"some text\"])  # -> label names {clf.labels[:4]}")
    return ctx.write_outputs(result, records, clf.write_files, usage, baseline_run.method_options(config))
