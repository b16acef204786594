"""Data files named `shipped:NAME` in a run config: data that packages ship, written once to the cache.

    data: {train_file: "shipped:rotten_tomatoes"}   # 8.5k one-sentence movie reviews, label negative/positive
    data: {train_file: "shipped:movie_preferences"} # 711 pairs: a positive review preferred to a negative one
"""

from __future__ import annotations

import dataclasses
import os

from ..data import DataConfig, DataError
from ..data.shipped import chatterbot_jsonl, default_cache_dir, movie_preferences_jsonl, movie_reviews_jsonl

PREFIX = "shipped:"

SHIPPED_DATA = {
    "rotten_tomatoes": ("Rotten Tomatoes reviews (8,530; text + label)", lambda: movie_reviews_jsonl("rotten_tomatoes")),
    "imdb": ("IMDB reviews (25,000 long reviews; text + label)", lambda: movie_reviews_jsonl("imdb")),
    "movie_reviews": ("IMDB + Rotten Tomatoes (33,530; text + label)", lambda: movie_reviews_jsonl(None)),
    "movie_preferences": ("IMDB preference pairs (711; prompt 'Write a positive movie review:', chosen positive, "
                          "rejected negative; reviews of <= 400 characters)", lambda: movie_preferences_jsonl()),
    "chatterbot_english": ("chatterbot-corpus English conversations (messages)",
                           lambda: chatterbot_jsonl(os.path.join(default_cache_dir(), "chatterbot-english.jsonl"))),
}


def resolve_file(name: str) -> str:
    if not name.startswith(PREFIX):
        return name
    key = name[len(PREFIX):]
    if key not in SHIPPED_DATA:
        known = ", ".join(f"{PREFIX}{k} ({d})" for k, (d, _) in SHIPPED_DATA.items())
        raise DataError(f"Unknown shipped data {name!r}; available: {known}.")
    return SHIPPED_DATA[key][1]()


def resolve_shipped(cfg: DataConfig) -> DataConfig:
    """The same config with every `shipped:NAME` file replaced by its cached path."""
    def fix(value):
        if isinstance(value, list):
            return [resolve_file(v) for v in value]
        return resolve_file(value) if isinstance(value, str) else value

    return dataclasses.replace(cfg, train_file=fix(cfg.train_file), eval_file=fix(cfg.eval_file))
