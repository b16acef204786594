"""Checked rows -> token ids and labels, per task; optional packing.

Each example is {"input_ids": [...], "labels": [...]} (classify: {"input_ids": [...], "label": int}).
Labels follow transformers' convention: the model shifts them (the logits at t predict labels[t + 1]) and
-100 is never a target.

- causal_lm: the tokenizer's own leading special tokens (BOS, found by probing it) + text + EOS; every
  token is a target. A text longer than max_length keeps its first max_length tokens (its EOS goes too:
  the document did not end there).
- sft, plain prompt: leading specials + prompt, then response + EOS. Prompt and response are tokenised
  separately and joined, so the boundary between them is exact: the targets are exactly the response's
  tokens and EOS. Instruction rows always use the plain prompt (Alpaca-style unless prompt_template is set);
  prompt/response rows use the tokenizer's chat template when it has one and prompt_template is None.
- sft, chat (`messages`, or ShareGPT `conversations` mapped to them by load.py): the conversation is rendered by
  `tokenizer.apply_chat_template` (data.chat_template, when set, is installed on the tokenizer first: templates.py).
  Assistant turn i is found by rendering messages[:i] with the generation prompt and messages[:i+1] without: the tokens between the two
  lengths are that turn (its text and the template's end-of-turn tokens) and are the only targets. Both
  renders must tokenise to prefixes of the whole conversation's tokens; a template that renders earlier
  turns differently (e.g. drops past reasoning) breaks that, and the row is refused rather than
  masked approximately.
- classify: leading specials + text + trailing specials (e.g. [CLS] ... [SEP]); label = label2id[label].
- reward / dpo (preference pairs): prompt + chosen and prompt + rejected are each encoded exactly as an sft
  prompt/response row (same template choice, same truncation); see pairs.py for the example's keys.

Truncation (sft): when an example is longer than max_length and its trained part (first target to the end)
fits, tokens are cut from the start of the prompt (after a BOS, which is kept), so the model still sees the
prompt's end and the whole response. When the trained part alone is too long, the end is cut instead.
An example left with no target (after the shift) is a bad row: raised, or skipped and counted.

Packing (causal_lm / sft): examples, each already at most max_length, are laid one after another into
sequences of up to max_length tokens in their given order (next-fit: a new sequence starts when the next
example does not fit), never splitting one. Each packed sequence records `position_ids` (restarting at 0
for each example) and `seq_lens`; the first token of every example gets label -100 so that no example's
last token is trained to predict the next example's start. The Collator turns this into an attention mask
that keeps examples apart.
"""

from __future__ import annotations

import logging
from typing import Any

from ..io.names import clip
from .config import PAIR_TASKS, TASKS, DataConfig, DataError
from .load import BadRow, SkipTally, bad_row_message
from .pairs import encode_pair
from .templates import TEMPLATES, install_chat_template

log = logging.getLogger(__name__)

IGNORE = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PLAIN_PROMPT = "{prompt}\n"


def encode_rows(rows: list[dict], task: str, tokenizer, cfg: DataConfig,
                label2id: dict[str, int] | None = None, *, report: dict | None = None) -> list[dict]:
    """Tokenise checked rows (from `load_splits`) for `task`.

    `report`, when given, is updated with what happened: rows in, examples out, truncated and skipped rows
    (reason -> count and file:row examples), packed sequences. Skipped rows are also logged as a warning.
    """
    if task not in TASKS:
        raise DataError(f"task {task!r} is not known; use one of: {', '.join(TASKS)}.")
    if cfg.packing and task not in ("causal_lm", "sft"):
        raise DataError(f"packing applies to causal_lm and sft only; set `packing: false` for {task}.")
    enc = _Encoder(tokenizer, cfg, task, label2id)
    examples = enc.encode_all(rows)
    sequences = pack(examples, cfg.max_length) if (cfg.packing and task != "classify") else None
    summary: dict[str, Any] = {"rows": len(rows), "examples": len(examples), "truncated": enc.truncated,
                               "skipped": enc.tally.as_dict()}
    if sequences is not None:
        summary["packed_sequences"] = len(sequences)
    if enc.tally.total:
        log.warning("encode_rows (%s): skipped %d of %d rows: %s", task, enc.tally.total, len(rows),
                    "; ".join(f"{k} x{v['count']} (e.g. {v['examples'][0]})" for k, v in summary["skipped"].items()))
    if report is not None:
        report.update(summary)
    return sequences if sequences is not None else examples


class _Encoder:
    def __init__(self, tokenizer, cfg: DataConfig, task: str, label2id: dict[str, int] | None) -> None:
        self.tok, self.cfg, self.task, self.L = tokenizer, cfg, task, cfg.max_length
        self.tally, self.truncated = SkipTally(), 0
        self.prefix, self.suffix = _special_edges(tokenizer)
        self.bos = getattr(tokenizer, "bos_token_id", None)
        if task == "classify":
            if label2id is None and cfg.labels is not None:
                label2id = {name: i for i, name in enumerate(cfg.labels)}
            if label2id is None:
                raise DataError("encode_rows for classify needs label2id (pass `splits.label2id` from load_splits) "
                                "or `labels: [...]` in the data config.")
            self.label2id = {str(k): v for k, v in label2id.items()}
        else:
            self.eos = getattr(tokenizer, "eos_token_id", None)
            # data.chat_template goes onto the tokenizer itself: the caller's tokenizer then renders (and saves
            # with the adapter) exactly the template the rows were encoded with.
            install_chat_template(tokenizer, cfg.chat_template)
            self.has_chat = bool(getattr(tokenizer, "chat_template", None))

    # ---- driving -----------------------------------------------------------------------------------------

    def encode_all(self, rows: list[dict]) -> list[dict]:
        out = []
        for index, row in enumerate(rows):
            try:
                out.append(self.encode_one(row))
            except BadRow as err:
                path, number = row.get("_file", "<rows>"), row.get("_row", index + 1)
                if not self.cfg.skip_bad_rows:
                    raise DataError(bad_row_message(path, number, err)) from None
                self.tally.add(f"{err.column}: {err.kind}", f"{path}:{number}")
        return out

    def encode_one(self, row: dict) -> dict:
        if self.task == "classify":
            return self._classify(row)
        if self.task == "causal_lm":
            ids = self.prefix + self._ids(row["text"]) + [self._eos()]
            if len(ids) > self.L:
                ids, self.truncated = ids[: self.L], self.truncated + 1
            return self._checked(ids, list(ids), "text")
        if self.task in PAIR_TASKS:
            return encode_pair(self, row)
        if "messages" in row:
            return self._chat(row["messages"], "messages")
        if "prompt" in row:
            return self.prompt_response(row["prompt"], row["response"], "response")
        fields = {"instruction": row["instruction"], "input": row.get("input") or ""}
        default = ALPACA_WITH_INPUT if fields["input"].strip() else ALPACA_NO_INPUT
        prompt = self._format(self.cfg.prompt_template or default, fields)
        return self._plain(prompt, row["output"], "output")

    # ---- pieces ------------------------------------------------------------------------------------------

    def prompt_response(self, prompt: str, response: str, column: str) -> dict:
        """One prompt/response pair -> {"input_ids", "labels"} (targets: the response and what ends it).
        The tokenizer's chat template when it has one and no prompt_template is set, else the plain prompt."""
        if self.has_chat and self.cfg.prompt_template is None:
            return self._chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                              column)
        return self._plain(self._format(self.cfg.prompt_template or PLAIN_PROMPT, {"prompt": prompt}), response,
                           column)

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _eos(self) -> int:
        if self.eos is None:
            raise DataError(f"The tokenizer has no eos_token, which {self.task} appends to every example so the "
                            f"model learns where text ends. Set one: `tokenizer.eos_token = '</s>'` (any token "
                            f"that marks the end).")
        return self.eos

    def _classify(self, row: dict) -> dict:
        label = str(row["label"])  # int labels are kept as their string form, as load_splits does
        if label not in self.label2id:
            raise BadRow("label", "not in label set", f"{label!r} is not in label2id ({', '.join(self.label2id)})",
                         label, "fix the row, or include the label in `labels: [...]`")
        body = self._ids(row["text"])
        room = self.L - len(self.prefix) - len(self.suffix)
        if len(body) > room:
            body, self.truncated = body[: max(room, 0)], self.truncated + 1
        ids = self.prefix + body + self.suffix
        if not body:
            raise BadRow("text", "nothing left after truncation", f"max_length={self.L} leaves no room for text",
                         row["text"], "raise max_length")
        return {"input_ids": ids, "label": self.label2id[label]}

    def _format(self, template: str, fields: dict[str, str]) -> str:
        try:
            return template.format(**fields)
        except (KeyError, IndexError, ValueError) as err:
            names = ", ".join("{" + f + "}" for f in fields)
            raise DataError(f"prompt_template {clip(template)} cannot be filled for {'/'.join(fields)} rows "
                            f"({type(err).__name__}: {err}); these rows offer {names}. Write literal braces as "
                            f"{{{{ and }}}}.") from None

    def _plain(self, prompt: str, response: str, column: str) -> dict:
        prompt_ids = self.prefix + self._ids(prompt)
        response_ids = self._ids(response) + [self._eos()]
        ids = prompt_ids + response_ids
        labels = [IGNORE] * len(prompt_ids) + response_ids
        return self._checked(*self._truncate(ids, labels), column)

    def _chat(self, messages: list[dict], column: str) -> dict:
        if not self.has_chat:
            raise DataError(f"Chat rows ('messages' / 'conversations') need a chat template, and this tokenizer has "
                            f"none (most pretrained bases ship none). Name one: `chat_template: NAME` (built-in: "
                            f"{', '.join(TEMPLATES)}) or a .jinja file; or write the rows as prompt/response.")
        full = self._render(messages, column, generation_prompt=False)
        labels = [IGNORE] * len(full)
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            start = self._render(messages[:i], column, generation_prompt=True)
            end = self._render(messages[: i + 1], column, generation_prompt=False)
            if full[: len(start)] != start or full[: len(end)] != end or len(end) <= len(start):
                raise BadRow(column, "chat template not prefix-consistent",
                             f"the chat template renders assistant turn {i} differently inside the whole "
                             f"conversation than on its own (or tokenisation merges across the turn's edge), so "
                             f"its tokens cannot be told apart exactly", msg["content"],
                             "use a template that renders earlier turns unchanged, or prompt/response rows with "
                             "a prompt_template")
            labels[len(start): len(end)] = full[len(start): len(end)]
        return self._checked(*self._truncate(full, labels), column)

    def _render(self, messages: list[dict], column: str, *, generation_prompt: bool) -> list[int]:
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja raises for conversations the template refuses (e.g. roles out of order)
            raise BadRow(column, "chat template refused the conversation",
                         f"the chat template failed on the first {len(messages)} message(s): "
                         f"{type(err).__name__}: {err}", [m["role"] for m in messages],
                         "reorder the turns as the template expects") from None
        return self._ids(text)

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Fit into max_length: cut the prompt's start when the trained part fits, else cut the end."""
        if len(ids) <= self.L:
            return ids, labels
        self.truncated += 1
        first = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(ids))
        head = 1 if (ids and self.bos is not None and ids[0] == self.bos and first > 0) else 0  # keep BOS
        cut = len(ids) - self.L
        if cut <= first - head:
            return ids[:head] + ids[head + cut:], labels[:head] + labels[head + cut:]
        return ids[: self.L], labels[: self.L]

    def _checked(self, ids: list[int], labels: list[int], column: str) -> dict:
        # The first token is never a target (nothing precedes it), so at least one later label must be kept.
        if not any(lab != IGNORE for lab in labels[1:]):
            raise BadRow(column, "no trainable token",
                         f"after tokenising and truncating to max_length={self.L} nothing is left to train "
                         f"({len(ids)} tokens, all prompt)", None,
                         "raise max_length or shorten the prompt", show_value=False)
        return {"input_ids": ids, "labels": labels}


def _special_edges(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. [BOS] / [CLS] and [SEP]).

    Found by encoding a probe with and without special tokens rather than from token names, which differ
    per tokenizer (and some tokenizers add no BOS at all)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i: i + len(plain)] == plain:
            return with_special[:i], with_special[i + len(plain):]
    return [], []


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Lay examples (each at most max_length tokens) into sequences of at most max_length, in order, whole."""
    sequences: list[dict] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if n > max_length:  # encode_rows truncates first; this guards direct callers
            raise DataError(f"pack: an example has {n} tokens, more than max_length={max_length}; truncate first.")
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            sequences.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        current["input_ids"] += ex["input_ids"]
        current["labels"] += [IGNORE] + list(ex["labels"][1:])  # never predict an example's start from the last one
        current["position_ids"] += list(range(n))
        current["seq_lens"].append(n)
    if current["input_ids"]:
        sequences.append(current)
    return sequences


__all__ = ["ALPACA_NO_INPUT", "ALPACA_WITH_INPUT", "IGNORE", "PLAIN_PROMPT", "encode_rows", "pack"]
