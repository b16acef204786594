"""Features + logistic regression end to end: the `peftlab train` run (`run`, given its run by the training layer),
fitting in Python (`fit_features`), and loading a saved folder to classify new texts (`load` ->
FeaturesClassifier.predict)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import torch

from ...core.config import CONFIG_NAME, ConfigError
from .. import baseline_run
from ..embeddings import (EmbedStats, cached_embeddings, embed_ids, model_fingerprint, texts_digest, tokenize_texts,
                          tokenizer_fingerprint)
from .classifier import CLASSIFIER_FILE, LABELS_FILE, LinearProbe, fit_probe
from .config import FeaturesConfig

DEFAULT_MAX_LENGTH = 512  # when neither the config nor a run gives one (DataConfig's default)


def extract_features(model, tokenizer, texts: Sequence[str], config: FeaturesConfig, *, model_path: str,
                     autocast_dtype: torch.dtype | None = None, stats: EmbedStats | None = None) -> torch.Tensor:
    """(N, H) float32 pooled hidden states of `texts`, read from the cache when the same model files, tokenizer,
    texts, max_length, pooling, layer, weight dtype and precision were embedded before. `model_path`: the folder (or hub
    id) the model was loaded from, which identifies its weights in the cache key."""
    max_length = config.max_length or DEFAULT_MAX_LENGTH
    texts = list(texts)

    def compute() -> torch.Tensor:
        seqs = tokenize_texts(tokenizer, texts, max_length)
        return embed_ids(model, seqs, pad_id=tokenizer.pad_token_id, pooling=config.pooling, layer=config.layer,
                         batch_size=config.batch_size, autocast_dtype=autocast_dtype, stats=stats)

    parts = {"what": "features", **model_fingerprint(model_path), "model_class": type(model).__name__,
             "tokenizer": tokenizer_fingerprint(tokenizer), "texts": texts_digest(texts), "n": len(texts),
             "max_length": max_length, "pooling": config.pooling, "layer": config.layer,
             "autocast": str(autocast_dtype)}
    weights = next(model.parameters()).dtype
    if weights != torch.float32:  # a base loaded in 16 bits embeds differently; fp32 keys stay as they were
        parts["dtype"] = str(weights)
    return cached_embeddings(config.cache_dir, parts, compute, stats)


def _check_not_constant(features: torch.Tensor, config: FeaturesConfig) -> None:
    spread = (features - features[0]).abs().max()
    if features.shape[0] > 1 and spread <= 1e-4 * features.abs().max().clamp(min=1.0):
        hint = (" With pooling 'cls' on a decoder (causal attention) the first token sees only itself, so every text "
                "gets the same vector: use pooling 'last' or 'mean'.") if config.pooling == "cls" else ""
        raise ConfigError(f"Every text got the same feature vector (pooling={config.pooling!r}, layer={config.layer}), "
                          f"so no classifier can tell them apart.{hint}")


class FeaturesClassifier:
    """A frozen base model + a fitted linear probe: text -> label."""

    def __init__(self, config: FeaturesConfig, probe: LinearProbe, model, tokenizer, model_path: str) -> None:
        self.config, self.probe, self.model, self.tokenizer = config, probe, model, tokenizer
        self.model_path = model_path

    @property
    def labels(self) -> list[str]:
        return self.probe.labels

    def features(self, texts: Sequence[str], cache: bool = False) -> torch.Tensor:
        """(N, H) features of `texts` (not cached unless cache=True: new texts are rarely seen twice)."""
        config = self.config if cache else dataclasses.replace(self.config, cache_dir="")
        return extract_features(self.model, self.tokenizer, texts, config, model_path=self.model_path)

    def predict_proba(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, K) class probabilities, columns in `labels` order."""
        return self.probe.log_probs(self.features(texts)).exp()

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.probe.predict(self.features(texts)).tolist()]

    def save_pretrained(self, folder: str) -> None:
        """adapter_config.json (peft_type FEATURES) + classifier.safetensors + labels.json, as one folder."""
        baseline_run.save_folder(folder, self.write_files, (CONFIG_NAME, CLASSIFIER_FILE, LABELS_FILE))

    def write_files(self, folder: str) -> None:
        self.config.save_pretrained(folder)
        self.probe.save(folder)


def fit_features(model_name_or_path: str, texts: Sequence[str], labels: Sequence[str],
                 config: FeaturesConfig | None = None, label_names: list[str] | None = None) -> FeaturesClassifier:
    """Fit a probe in Python: `labels` are label names, one per text; `label_names` fixes the class order (default:
    sorted)."""
    config = config or FeaturesConfig()
    names = list(label_names) if label_names is not None else sorted(set(labels))
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise ConfigError(f"labels {unknown} are not in label_names {names}.")
    config = dataclasses.replace(config, base_model_name_or_path=model_name_or_path,
                                 max_length=config.max_length or DEFAULT_MAX_LENGTH)
    tokenizer, model, path = baseline_run.load_frozen_base(model_name_or_path, "AutoModel")
    X = extract_features(model, tokenizer, texts, config, model_path=path)
    _check_not_constant(X, config)
    y = torch.tensor([names.index(lab) for lab in labels])
    probe = fit_probe(X, y, names, C=config.C, max_iter=config.max_iter, class_weight=config.class_weight)
    return FeaturesClassifier(config, probe, model, tokenizer, path)


def load(folder: str, model=None, tokenizer=None) -> FeaturesClassifier:
    """A saved features folder (from `peftlab train` or save_pretrained) as a classifier. The base model named in
    its adapter_config.json is loaded unless `model` and `tokenizer` are given."""
    config = baseline_run.read_saved_config(folder, FeaturesConfig, "features")
    probe = LinearProbe.load(folder)
    base = config.base_model_name_or_path
    if model is None or tokenizer is None:
        if not base:
            raise ConfigError(f"{os.path.join(folder, CONFIG_NAME)} names no base model (base_model_name_or_path); "
                              "pass model= and tokenizer=.")
        tokenizer, model, model_path = baseline_run.load_frozen_base(base, "AutoModel")
    else:
        model_path = base or type(model).__name__
    return FeaturesClassifier(config, probe, model, tokenizer, model_path)


def run(ctx) -> dict:
    """`peftlab train` with method: features (Method.run; `ctx`: the run, peftlab.train.method_run.MethodRun): embed
    train and eval rows with the frozen base model in the run's dtype (cached), fit the probe on the train rows,
    evaluate on the eval rows, hand the results to the run folder's writer."""
    run_config, log = ctx.run, ctx.log
    splits = ctx.classify_splits("features")
    config = dataclasses.replace(run_config.method, base_model_name_or_path=run_config.model,
                                 max_length=run_config.method.max_length or run_config.data.max_length)
    label_names = splits.labels
    label2id = splits.label2id
    tokenizer, model, model_path = baseline_run.load_frozen_base(run_config.model, "AutoModel", ctx.base_dtype)
    autocast = ctx.autocast_dtype
    train_stats, eval_stats = EmbedStats(), EmbedStats()
    start = time.perf_counter()
    X_train = extract_features(model, tokenizer, [r["text"] for r in splits.train], config, model_path=model_path,
                               autocast_dtype=autocast, stats=train_stats)
    how = (f"read from {train_stats.cache_file}" if train_stats.cache_hit else
           f"computed in {train_stats.seconds:.1f} s")
    log(f"features: {tuple(X_train.shape)} train features {how}")
    _check_not_constant(X_train, config)
    y_train = torch.tensor([label2id[r["label"]] for r in splits.train])
    fit_start = time.perf_counter()
    probe = fit_probe(X_train, y_train, label_names, C=config.C, max_iter=config.max_iter,
                      class_weight=config.class_weight)
    fit_seconds = time.perf_counter() - fit_start
    train_seconds = time.perf_counter() - start
    X_eval = extract_features(model, tokenizer, [r["text"] for r in splits.eval], config, model_path=model_path,
                              autocast_dtype=autocast, stats=eval_stats)
    y_eval = torch.tensor([label2id[r["label"]] for r in splits.eval])
    log_probs = probe.log_probs(X_eval)
    after = {"loss": float(-log_probs[torch.arange(len(y_eval)), y_eval].mean()),
             **baseline_run.classification_metrics(log_probs.argmax(1).tolist(), y_eval.tolist(), len(label_names))}

    adapter_dir = ctx.adapter_dir
    classifier = FeaturesClassifier(config, probe, model, tokenizer, model_path)
    tokens = train_stats.tokens + eval_stats.tokens
    seconds = train_stats.seconds + eval_stats.seconds
    result = {"before": None, "after": after, "steps": 0, "train_seconds": train_seconds,
              "tokens_per_s": tokens / seconds if tokens else 0.0, "stopped_early": False,
              "adapter_dir": adapter_dir, "data": splits.report,
              "trainable_params": probe.num_params, "all_params": baseline_run.count_params(model) + probe.num_params}
    cache = ("read from the cache" if train_stats.cache_hit and eval_stats.cache_hit else
             f"computed ({tokens:,} tokens in {seconds:.1f} s) and cached")
    states = "the last hidden state" if config.layer is None else f"hidden_states[{config.layer}]"
    note = (f"## Features\n\n{X_train.shape[1]}-dim {config.pooling} pooling of {states} of {run_config.model} "
            f"(texts cut at {config.max_length} tokens), {len(splits.train):,} train and {len(splits.eval):,} eval "
            f"texts, {cache}. Standardised, then LogisticRegression(C={config.C}, class_weight={config.class_weight}) "
            f"fitted in {fit_seconds:.2f} s ({probe.n_iter} L-BFGS iterations of at most {config.max_iter}): "
            f"{probe.num_params:,} parameters. Files: adapter_config.json, classifier.safetensors (coef, intercept, "
            f"scaler_mean, scaler_scale; float64), labels.json.")
    result["method_notes"] = [note]
    usage = (f"from peftlab.methods.features import load\nclf = load({adapter_dir!r})  # loads {run_config.model}\n"
             f"clf.predict([\"some text\"])  # -> label names {label_names[:4]}; predict_proba gives probabilities")
    records = [baseline_run.eval_record(after, "after")]
    ctx.write_outputs(result, records, classifier.write_files, usage, baseline_run.method_options(config))
    log(f"features: eval loss {after['loss']:.4f}, accuracy {after['accuracy']:.4f}, macro-F1 {after['macro_f1']:.4f}")
    return result
