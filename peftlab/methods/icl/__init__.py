"""In-context learning: classification by a frozen causal LM reading a prompt, with no parameter trained.

For a query text q, labels y in Y with words w(y) (the verbaliser) and demonstrations D (k labelled training rows,
or none for zero-shot), the prompt x = prompt(D, q) is built as peftlab/methods/icl/prompts.py documents, and

    s(y) = sum_{j=1..m_y} log P(c_j | x, c_<j)      c = the tokens of w(y) after x  (m_y of them)
    s(y) = s(y) / m_y                               with length_normalize
    prediction = argmax_y s(y)
    loss = -log softmax_y(s)[true label]            the label choice's cross-entropy, averaged over eval rows

reported with accuracy and macro-F1 like the training loop's classification eval. The model is loaded with its
language-modelling head (AutoModelForCausalLM), not a classification head.

Demonstrations: random (per query, seeded by (seed, query text); balanced: k of each label, shuffled) or retrieved
(the k training rows nearest the query by cosine similarity of all-MiniLM-L6-v2 embeddings, exact search, the most
similar last; retrieval.py). Retrieval embeds the training rows once and caches them on disk (8,530 Rotten
Tomatoes reviews: one MiniLM pass, 13 MB of vectors).

Where. `peftlab train` with `method: {name: icl, k: 4, example_format: "Review: {text}\\nSentiment: {label}"}` and
`task: classify` (the Method's `run` hook takes over the run). With k > 0 it also scores zero-shot and reports it as
`before` (zero_shot_baseline). It writes output_dir/metrics.jsonl (eval records tagged "stage": zero_shot / k_shot),
run_config.yaml and output_dir/adapter/: adapter_config.json (peft_type ICL, peftlab's own: the prompt recipe),
labels.json, demonstrations.jsonl (the training rows, when k > 0) and a README.md card with an example prompt.
In Python:

    from peftlab.methods.icl import IclClassifier, IclConfig, load
    clf = IclClassifier(IclConfig(k=4), ["negative", "positive"], model, tokenizer, pool=[(text, label), ...])
    clf.predict(["a fine film"]); clf.save_pretrained("out/icl"); load("out/icl").predict([...])

It wraps no module: `get_peft_model` with an IclConfig raises and points here. Cost: see scoring.py.

Measured (SmolLM2-135M-Instruct, fp32, 1 thread of a 2-core CPU shared with other jobs): Rotten Tomatoes, 1,000 train
rows to retrieve from, 100 eval rows, texts cut at 64 tokens, instruction "Classify the sentiment of each movie review
as {labels}.", format "Review: {text}\nSentiment: {label}": zero-shot accuracy 0.42 (macro-F1 0.33, loss 1.05),
4-shot retrieved 0.67 (macro-F1 0.66, loss 0.62); MiniLM embedded the 1,000 rows in 14 s (then cached), scoring both
settings forwarded 22,813 tokens in 110 s.
"""

from ...core.config import ConfigError
from ...core.method import Method, register
from .config import IclConfig
from .prompts import PromptBuilder, select_random
from .run import IclClassifier, load, run
from .scoring import score_continuations


def _not_an_adapter(model, config: IclConfig):
    raise ConfigError(
        "icl (in-context learning) is not an adapter that get_peft_model can inject into a model: nothing in the "
        "network trains. Run it with `peftlab train` (method: icl, task: classify), or in Python with "
        "peftlab.methods.icl.IclClassifier(IclConfig(...), labels, model, tokenizer, pool).predict(texts).")


METHOD = register(Method(
    name="icl",
    config_cls=IclConfig,
    layers=(),
    summary="In-context learning: zero/k-shot prompts (random or MiniLM-retrieved demonstrations), labels scored by "
            "log-likelihood; peftlab train only",
    merges=False,
    complete_config=_not_an_adapter,
    run=run,
))

__all__ = ["IclClassifier", "IclConfig", "METHOD", "PromptBuilder", "load", "run", "score_continuations",
           "select_random"]
