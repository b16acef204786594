"""The features baseline's options: how texts become vectors, and the logistic regression fitted on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig, ConfigError, check_choice, check_number

CLASS_WEIGHTS = [None, "balanced"]


@dataclass
class FeaturesConfig(AdapterConfig):
    """Feature extraction + logistic regression: the frozen base model embeds every text once (pooled hidden states,
    cached on disk), and scikit-learn's LogisticRegression is fitted on the standardised vectors. Run it with
    `peftlab train` (method: features, task: classify) or peftlab.methods.features.fit_features in Python; it is
    not an adapter that get_peft_model can inject."""

    peft_type: ClassVar[str] = "FEATURES"

    pooling: str = "mean"
    """How a text's token states become one vector: mean (average over real tokens), last (the last real token: a
    decoder's summary of the text) or cls (the first token: BERT's [CLS]; useless for decoders, whose first token sees
    only itself)."""

    layer: int | None = None
    """Which hidden states to pool: None is the model's last hidden state (after the final norm); an int indexes
    transformers' hidden_states (0 = embeddings, i = after block i, -1 = last)."""

    C: float = 1.0
    """Inverse regularisation strength of the logistic regression (scikit-learn's C; smaller = stronger L2)."""

    max_iter: int = 1000
    """Most L-BFGS iterations of the logistic regression fit."""

    class_weight: str | None = None
    """None: every example counts once. balanced: examples are weighted by n / (classes x rows of their class)
    (scikit-learn's class_weight="balanced"), for skewed label counts."""

    batch_size: int = 16
    """Texts per forward pass when computing features."""

    max_length: int | None = None
    """Tokens per text (longer texts are cut, special tokens kept). None: the run's data.max_length; saved files
    record the value used."""

    cache_dir: str | None = None
    """Folder of the feature cache (one safetensors file per model + tokenizer + texts + pooling + layer). None:
    <peftlab cache>/embeddings ($PEFTLAB_CACHE or ~/.cache/peftlab); "" turns the cache off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        from ..embeddings import POOLINGS  # here, not at the top: embeddings imports torch, and configs do not

        if self.pooling not in POOLINGS:
            raise ConfigError(f"{name}.pooling={self.pooling!r} is not valid; use one of: {', '.join(POOLINGS)} "
                              f"(mean over real tokens, last real token, cls = first token).")
        if self.layer is not None:
            check_number(name, "layer", self.layer, integer=True)
        check_number(name, "C", self.C, low=0, low_inclusive=False)
        check_number(name, "max_iter", self.max_iter, low=1, integer=True)
        check_choice(name, "class_weight", self.class_weight, CLASS_WEIGHTS)
        check_number(name, "batch_size", self.batch_size, low=1, integer=True)
        if self.max_length is not None:
            check_number(name, "max_length", self.max_length, low=2, integer=True)
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ConfigError(f"{name}.cache_dir={self.cache_dir!r} is not valid; give a folder path, or \"\" for "
                              f"no cache.")
