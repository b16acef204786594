"""What a language-modelling fine-tune writes: greedy continuations of the eval prompts, scored per row.

For each eval row (encoded without packing, so one row is one example):

- sft: the prompt is the row's tokens before its first target (the prompt part, chat template included) and the
  reference the first run of target tokens (the response and the token that ends it);
- causal_lm: the prompt is the first half of the row's tokens and the reference the rest, at most
  `max_new_tokens` of them (raw text has no prompt/response split; the second half is what the text goes on to say).

The model continues the prompt greedily for at most `max_new_tokens` tokens (stopping at the tokenizer's EOS), and
the decoded text (special tokens dropped, outer whitespace stripped) is scored against the decoded reference:
exact match (1 if the texts are equal) and ROUGE-L F-measure (Google's `rouge-score` package: longest common
subsequence of lower-cased words). The row's teacher-forced loss is recorded too (its summed next-token
cross-entropy and token count, from the task's own loss), so an interval for the eval loss can be bootstrapped
over rows.

`score_saved_run` loads a finished run's adapter into a fresh Trainer (as `peftlab eval` does) and scores the
adapter and the base model (adapters disabled) on the same rows.
"""

from __future__ import annotations

import dataclasses

import torch

IGNORE = -100
EXAMPLES_KEPT = 3  # (prompt, reference, prediction) texts kept per stage, for a reader to see what "0.31" means


def split_example(example: dict, task: str, max_new_tokens: int) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids) of one encoded row; None when it has no prompt or no reference."""
    ids, labels = list(example["input_ids"]), list(example["labels"])
    if task == "sft":
        start = next((i for i, lab in enumerate(labels) if lab != IGNORE), None)
        if not start:  # no target, or a target at position 0 (nothing to prompt with)
            return None
        end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
        return ids[:start], ids[start:end]
    half = len(ids) // 2
    if half == 0:
        return None
    return ids[:half], ids[half:half + max_new_tokens]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of `prediction` against `reference` (rouge-score's default tokenizer, no stemming)."""
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER


@torch.no_grad()
def score_rows(model, tokenizer, examples: list[dict], task, run, collator, max_new_tokens: int) -> dict:
    """Per-row scores of `model` (a PeftModel, evaluated as it is: adapters on or off) on encoded `examples`:
    {"exact_match": [0/1, ...], "rougeL": [...], "loss_sum": [...], "tokens": [...], "examples": [...]}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: dict[str, list] = {"exact_match": [], "rougeL": [], "loss_sum": [], "tokens": [], "examples": []}
    for example in examples:
        pair = split_example(example, task.name, max_new_tokens)
        if pair is None:
            continue
        prompt, reference = pair
        batch = {k: v.to(device) for k, v in collator([example]).items() if torch.is_tensor(v)}
        scored = task.forward(model, model, batch, run)  # the loop's own loss on this row
        ids = torch.tensor([prompt], device=device)
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        prediction = tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True).strip()
        target = tokenizer.decode(reference, skip_special_tokens=True).strip()
        out["exact_match"].append(float(prediction == target))
        out["rougeL"].append(rouge_l(prediction, target))
        out["loss_sum"].append(float(scored.loss_sum))
        out["tokens"].append(int(scored.units))
        if len(out["examples"]) < EXAMPLES_KEPT:
            out["examples"].append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                                    "reference": target, "prediction": prediction})
    model.train(was_training)
    return out


def score_saved_run(run, adapter_dir: str, max_new_tokens: int, base: bool = True) -> dict:
    """{"after": scores of the saved adapter, "base": scores with adapters disabled, "max_new_tokens", "rows"} on
    the run's eval rows (score_rows). For weight adapters only (a method with its own `run`, such as icl, saves no
    weights to load). "base" only when asked and when disabling the adapter gives the base model back (not for
    methods that train base weights in place: full, last_layers, BitFit, Delta-LoRA)."""
    from ..data import encode_rows, load_splits
    from ..io import adapter_files
    from .loop import Trainer

    trainer = Trainer(run, log=lambda *_: None, prepare=False)  # the saved adapter is the prepared one
    trainer.peft_model.load_tensors("default", adapter_files.read_weights(adapter_dir), adapter_dir)
    unpacked = dataclasses.replace(run.data, packing=False)  # one row, one example: prompts and references intact
    examples = encode_rows(load_splits(unpacked, run.task).eval, run.task, trainer.tokenizer, unpacked)
    args = (trainer.tokenizer, examples, trainer.task, run, trainer.collator, max_new_tokens)
    out = {"max_new_tokens": max_new_tokens, "after": score_rows(trainer.peft_model, *args)}
    out["rows"] = len(out["after"]["rougeL"])
    if base and not trainer.peft_model.trains_base_in_place(trainer.peft_model.active_adapters):
        with trainer.peft_model.disable_adapter():
            out["base"] = score_rows(trainer.peft_model, *args)
    return out
