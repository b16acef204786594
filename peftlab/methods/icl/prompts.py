"""Prompts for in-context classification, and the choice of demonstrations.

Without a chat template, the prompt for query text q with demonstrations (t_1, y_1) .. (t_k, y_k) is

    {instruction}{separator}{format(t_1, w(y_1))}{separator} ... {format(t_k, w(y_k))}{separator}{query part of q}

(the instruction and its separator are left out when the instruction is empty), where format fills example_format,
w(y) is label y's words and the query part is example_format filled up to {label}. Spaces right before {label} are
moved from the prompt into each label's continuation: with the default format, "...Label:" is the prompt and
" positive" the continuation. The prompt's tokens are the tokenizer's leading special tokens (BOS, if it adds one)
and the prompt text's; a continuation's tokens are those that tokenising prompt + continuation adds after the
prompt's tokens (the tokens of the continuation alone, if the two tokenisations do not share that prefix).

With chat_template, the conversation is: user "{instruction}{separator}{query part of t_1}", assistant "w(y_1)", ...,
user "{query part of q}" (the instruction opens the first user turn), rendered by the tokenizer's chat template with
the generation prompt; the continuation is w(y) as the assistant's reply.

Every text (demonstrations' and the query's) is cut to max_length tokens first.

Demonstrations: `select_random` draws k rows (or k per label) with a generator seeded by (seed, query text), so a
query gets the same demonstrations whichever batch or position it comes in; `select_retrieved` (in run.py) takes the
k training rows nearest to the query in MiniLM space, least similar first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ...core.config import ConfigError
from .config import LABEL_MARK, TEXT_MARK, IclConfig


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. BOS), found by probing, as the data layer does."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i: i + len(plain)] == plain:
            return with_special[:i]
    return []


class PromptBuilder:
    """Builds prompt text and token ids for one config, label set and tokenizer."""

    def __init__(self, config: IclConfig, labels: list[str], tokenizer, max_length: int | None = None) -> None:
        self.config, self.labels, self.tok = config, list(labels), tokenizer
        self.words = config.words_for(self.labels)
        self.max_length = max_length or config.max_length
        filled = config.example_format.format(text=TEXT_MARK, label=LABEL_MARK)
        self._before, self._after = filled.split(LABEL_MARK)
        if config.chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("icl chat_template=True, but this tokenizer has no chat template. Set chat_template: "
                              "false (the plain prompt), or use the model's instruct tokenizer.")
        self.prefix = [] if config.chat_template else _special_prefix(tokenizer)
        self.truncated = 0
        self.split_fallbacks = 0

    # ---- text ------------------------------------------------------------------------------------------------------

    def cut(self, text: str) -> str:
        if not self.max_length:
            return text
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_length:
            return text
        self.truncated += 1
        return self.tok.decode(ids[: self.max_length])

    def query_part(self, text: str) -> str:
        return self._before.replace(TEXT_MARK, self.cut(text))

    def demo_part(self, text: str, label: str) -> str:
        word = self.words[self.labels.index(label)]
        return self.query_part(text) + word + self._after.replace(TEXT_MARK, "")

    def instruction(self) -> str:
        return self.config.instruction.format(labels=", ".join(self.words))

    def prompt(self, query: str, demos: Sequence[tuple[str, str]]) -> tuple[str, list[str]]:
        """(prompt text, one continuation text per label)."""
        if self.config.chat_template:
            return self._chat_prompt(query, demos)
        parts = [self.instruction()] if self.config.instruction else []
        parts += [self.demo_part(t, y) for t, y in demos]
        parts.append(self.query_part(query))
        text = self.config.separator.join(parts)
        stripped = text.rstrip(" ")
        space = text[len(stripped):]
        return stripped, [space + w for w in self.words]

    def _chat_prompt(self, query: str, demos: Sequence[tuple[str, str]]) -> tuple[str, list[str]]:
        messages = []
        for t, y in demos:
            messages.append({"role": "user", "content": self.query_part(t).rstrip()})
            messages.append({"role": "assistant", "content": self.words[self.labels.index(y)]})
        messages.append({"role": "user", "content": self.query_part(query).rstrip()})
        if self.config.instruction:
            messages[0]["content"] = self.instruction() + self.config.separator + messages[0]["content"]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, list(self.words)

    # ---- tokens ----------------------------------------------------------------------------------------------------

    def encode(self, query: str, demos: Sequence[tuple[str, str]]) -> tuple[list[int], list[list[int]]]:
        """(prompt ids, one list of continuation ids per label)."""
        text, conts = self.prompt(query, demos)
        prompt_ids = self.prefix + list(self.tok(text, add_special_tokens=False)["input_ids"])
        out = []
        for cont in conts:
            whole = self.prefix + list(self.tok(text + cont, add_special_tokens=False)["input_ids"])
            if whole[: len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
                ids = whole[len(prompt_ids):]
            else:  # the tokenizer merged across the boundary: score the continuation's own tokens
                self.split_fallbacks += 1
                ids = list(self.tok(cont, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ConfigError(f"The label words {cont!r} tokenise to nothing; give label_words that are text.")
            out.append(ids)
        return prompt_ids, out


def select_random(pool: Sequence[tuple[str, str]], labels: list[str], k: int, balanced: bool, seed: int,
                  query: str) -> list[tuple[str, str]]:
    """k rows of `pool` ((text, label) pairs) drawn without replacement, or k of each label (shuffled) when balanced;
    the draw depends only on (seed, query)."""
    if k == 0:
        return []
    rng = random.Random(f"peftlab:icl:{seed}:{query}")
    if not balanced:
        if k > len(pool):
            raise ConfigError(f"icl k={k} demonstrations, but only {len(pool)} training rows; lower k.")
        return [pool[i] for i in rng.sample(range(len(pool)), k)]
    chosen = []
    for lab in labels:
        rows = [i for i, (_, y) in enumerate(pool) if y == lab]
        if len(rows) < k:
            raise ConfigError(f"icl balanced k={k} needs {k} training rows of label {lab!r}, but there are "
                              f"{len(rows)}; lower k or set balanced: false.")
        chosen += rng.sample(rows, k)
    rng.shuffle(chosen)
    return [pool[i] for i in chosen]
