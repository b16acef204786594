"""A trained `task: classify` run as a text classifier: label names, probabilities and predictions for new texts.

    clf = TextClassifier.from_run("out/default")          # the folder `peftlab train` wrote (run_config.yaml, adapter/)
    clf.labels                                           # ['negative', 'positive'] for the default run
    clf.predict_proba(["A joy from start to finish."])   # tensor([[0.08, 0.92]]), rows sum to 1, columns = labels
    clf.predict(["Dull and far too long."])               # ['negative']

Texts are encoded as the run encoded its rows (the classify task: special tokens around the text, max_length from
the run's data config, a longer text loses its end) and batched by length; the head's logits go through a softmax.
The label names come from the run's saved config (`data.labels`, which the loop fills with the label set it found
in the data); a run saved before that was recorded gets them by reading its training file again, as training did.

Whole-run baselines have their own classifiers: `peftlab.methods.features.load(folder)` and
`peftlab.methods.icl.load(folder)`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

from ..core.config import ConfigError
from ..data import Collator, encode_rows, load_splits
from .config import load_finished_run
from .sources import resolve_shipped


class TextClassifier:
    def __init__(self, model, tokenizer, labels: Sequence[str], data, device: str | torch.device | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        """model: a sequence-classification model (a PeftModel with the adapter loaded, or a plain one) whose head has
        len(labels) outputs; data: the DataConfig that encodes a text (max_length, columns are not used);
        autocast_dtype: run the model under torch.autocast in this dtype (a bf16/fp16 base beside the fp32 head and
        adapter, as training ran it); None: as it is."""
        self.model = model.eval()
        self.autocast_dtype = autocast_dtype
        self.tokenizer = tokenizer
        self.labels = [str(label) for label in labels]
        # Rows are built here from the texts given, never read from files: skipping would misalign the output.
        self.data = dataclasses.replace(data, skip_bad_rows=False, packing=False, labels=self.labels)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.collator = Collator(tokenizer.pad_token_id, "classify")

    @classmethod
    def from_run(cls, run_dir: str, adapter_dir: str | None = None, device: str | torch.device | None = None
                 ) -> "TextClassifier":
        """The base model and adapter of a `peftlab train` run with task classify (`adapter_dir` defaults to
        run_dir/adapter; give a checkpoint's adapter folder to use that)."""
        from ..core.method import method_for_config
        from .model_loading import autocast_for, load_trained_adapter

        run = load_finished_run(run_dir, "classify", "TextClassifier.from_run")
        method = method_for_config(run.method)
        if method.run is not None:
            raise ConfigError(f"TextClassifier.from_run: {run_dir!r} is a {method.name} run, which trains no adapter "
                              f"for this model; load it with peftlab.methods.{method.name}.load("
                              f"{os.path.join(run_dir, 'adapter')!r}).")
        labels = run.data.labels
        if labels is None:  # saved before the loop recorded its label set: derive it as training did
            labels = load_splits(resolve_shipped(run.data), "classify").report["labels"]
        adapter_dir = adapter_dir or os.path.join(run_dir, "adapter")
        if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
            raise ConfigError(f"TextClassifier.from_run: no adapter in {adapter_dir!r} (no adapter_config.json); the "
                              "run may not have finished. Give adapter_dir=<a checkpoint's adapter folder> or rerun.")
        # the base as the run trained it (run.base_dtype: model.dtype resolved, e.g. auto -> bf16; qlora's 4 bits)
        tokenizer, model = load_trained_adapter(run.model, "AutoModelForSequenceClassification", list(labels),
                                                adapter_dir, dtype=run.base_dtype, method_config=run.method)
        return cls(model, tokenizer, labels, run.data, device=device, autocast_dtype=autocast_for(run.base_dtype))

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N, len(labels)) float32 probabilities on the CPU, rows in the order of `texts`."""
        if isinstance(texts, str):
            raise ValueError("TextClassifier: give a list of texts; got one string (wrap it: [text]).")
        texts = list(texts)
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise ValueError(f"TextClassifier: texts {empty[:5]} are empty or not strings (e.g. {texts[empty[0]]!r}); "
                             "a classifier needs some text to read. Drop or replace them first.")
        rows = [{"text": t, "label": self.labels[0]} for t in texts]  # the label is required by the encoder, unused
        examples = encode_rows(rows, "classify", self.tokenizer, self.data)
        out = torch.empty(len(texts), len(self.labels), dtype=torch.float32)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # little padding
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = self.collator([examples[i] for i in idx])
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device)).logits
            if logits.shape[-1] != len(self.labels):
                raise ConfigError(f"TextClassifier: the model's head gives {logits.shape[-1]} outputs for "
                                  f"{len(self.labels)} labels {self.labels}; the adapter belongs to another label set.")
            out[idx] = torch.softmax(logits.float(), dim=-1).cpu()
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[str]:
        """The most probable label of each text."""
        return [self.labels[i] for i in self.predict_proba(texts, batch_size).argmax(-1).tolist()]


__all__ = ["TextClassifier"]
