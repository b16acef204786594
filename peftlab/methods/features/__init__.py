"""Feature extraction + logistic regression: the classic baseline that trains no part of the network.

    x_i = pool(h^(layer)(text_i))        the frozen base model's hidden states of one layer, pooled to (H,)
                                          (mean over real tokens | last real token | first token;
                                          peftlab/methods/embeddings.py)
    z_i = (x_i - mu) / s                 standardised with the train rows' mean and standard deviation
    p(y | x) = softmax(W z + b)          multinomial logistic regression, L2 penalty 1 / (2C) ||W||^2, fitted by
                                          scikit-learn (L-BFGS); two classes: one row w, p(1 | x) = sigmoid(w z + b)

Features are computed once per (model files, tokenizer, texts, max_length, pooling, layer, weight dtype, precision)
and cached as a safetensors file (peftlab.methods.embeddings.cached_embeddings), so trying other values of C or
class_weight re-reads them instead of running the model again. A run loads the base in its model.dtype. Reported like
the training loop: eval `loss` (log-loss: mean -log p(true label), natural log), `accuracy`, `macro_f1` (scikit-learn's,
as the loop's classification eval defines them).

Where. `peftlab train` with `method: {name: features, pooling: mean, C: 1.0}` and `task: classify` (the Method's
`run` hook takes over the run: no optimizer steps). It writes output_dir/metrics.jsonl (one eval record),
run_config.yaml and output_dir/adapter/: adapter_config.json (peft_type FEATURES, peftlab's own), classifier.safetensors
(coef (K', H), intercept (K',), scaler_mean (H,), scaler_scale (H,), float64), labels.json and a README.md card.
In Python:

    from peftlab.methods.features import FeaturesConfig, fit_features, load
    clf = fit_features("smollm2", texts, labels, FeaturesConfig(pooling="last"))
    clf.save_pretrained("out/probe"); clf = load("out/probe"); clf.predict(["a fine film"])

It wraps no module: `get_peft_model` with a FeaturesConfig raises and points here.

Cost: one forward pass over every train and eval text (no backward), then a logistic regression on (N, H) features.
Measured with `peftlab train method=features data.max_train_rows=500 data.max_eval_rows=200` (SmolLM2-135M, Rotten
Tomatoes, texts cut at 64 tokens, fp32, 1 thread of a 2-core CPU shared with other jobs): 17,567 tokens embedded in
112 s, the fit 1.0 s (45 L-BFGS iterations), eval accuracy 0.675 / loss 1.26 at C=1 (576 features, 500 rows:
overfit); re-running with method.C=0.01 read the features from the cache (14 s wall in all, mostly loading the
model) and gave accuracy 0.730 / loss 0.58.
"""

from ...core.config import ConfigError
from ...core.method import Method, register
from .classifier import CLASSIFIER_FILE, LABELS_FILE, LinearProbe, fit_probe
from .config import FeaturesConfig
from .run import FeaturesClassifier, extract_features, fit_features, load, run


def _not_an_adapter(model, config: FeaturesConfig):
    raise ConfigError(
        "features (frozen features + logistic regression) is not an adapter that get_peft_model can inject into a "
        "model: nothing in the network trains. Run it with `peftlab train` (method: features, task: classify), or "
        "in Python with peftlab.methods.features.fit_features(model, texts, labels, FeaturesConfig(...)) and "
        "load(folder).predict(texts).")


METHOD = register(Method(
    name="features",
    config_cls=FeaturesConfig,
    layers=(),
    summary="Frozen features (pooled hidden states, cached) + scikit-learn logistic regression; peftlab train only",
    merges=False,
    complete_config=_not_an_adapter,
    run=run,
))

__all__ = ["CLASSIFIER_FILE", "FeaturesClassifier", "FeaturesConfig", "LABELS_FILE", "LinearProbe", "METHOD",
           "extract_features", "fit_features", "fit_probe", "load", "run"]
