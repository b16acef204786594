"""The linear probe: standardise the features, then a (multinomial) logistic regression, fitted by scikit-learn.

With features x (H,), the scaler's mean mu and scale s (the per-feature standard deviation, 1 where it is 0), and
the regression's W (K', H), b (K'):
    z = (x - mu) / s
    K >= 3 classes: logits = W z + b (K' = K), p = softmax(logits)
    K = 2:          scikit-learn keeps one row (K' = 1), d = w z + b, p(class 1) = sigmoid(d): the same as a softmax
                    over the two logits [0, d], which is how `log_probs` computes both cases.
The saved file holds W, b, mu and s in float64 (scikit-learn's precision, so a reloaded probe predicts exactly what
the fitted one did); prediction needs only torch, not scikit-learn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ...core.config import ConfigError
from ...io.atomic import atomic_write_text, atomic_write_with

CLASSIFIER_FILE = "classifier.safetensors"
LABELS_FILE = "labels.json"
SKLEARN_PIP = "pip install scikit-learn"


@dataclass
class LinearProbe:
    coef: torch.Tensor
    """(K', H) float64: one row per class, or one row for two classes (scikit-learn's binary layout)."""
    intercept: torch.Tensor
    """(K',) float64."""
    mean: torch.Tensor
    """(H,) float64: the scaler's per-feature mean."""
    scale: torch.Tensor
    """(H,) float64: the scaler's per-feature standard deviation (1 where a feature is constant)."""
    labels: list[str]
    """Label names in class-id order."""
    n_iter: int | None = None
    """L-BFGS iterations the fit took (None for a loaded probe)."""

    @property
    def num_params(self) -> int:
        """Fitted weights of the regression (W and b); the scaler's mu and s are statistics, not counted."""
        return self.coef.numel() + self.intercept.numel()

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, K) log-probabilities, float64."""
        z = (features.to(torch.float64) - self.mean) / self.scale
        logits = z @ self.coef.T + self.intercept  # (N, K')
        if self.coef.shape[0] == 1:
            # binary: softmax([0, d]) = [1 - σ(d), σ(d)]
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
        return torch.log_softmax(logits, dim=1)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.log_probs(features).argmax(1)

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        tensors = {"coef": self.coef.contiguous(), "intercept": self.intercept.contiguous(),
                   "scaler_mean": self.mean.contiguous(), "scaler_scale": self.scale.contiguous()}
        atomic_write_with(os.path.join(folder, CLASSIFIER_FILE), lambda tmp: save_file(tensors, tmp))
        atomic_write_text(os.path.join(folder, LABELS_FILE), json.dumps(self.labels, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str) -> "LinearProbe":
        from safetensors.torch import load_file

        path = os.path.join(folder, CLASSIFIER_FILE)
        if not os.path.isfile(path):
            found = sorted(os.listdir(folder)) if os.path.isdir(folder) else "no such folder"
            raise FileNotFoundError(f"{folder} has no {CLASSIFIER_FILE}; it is not a folder written by the features "
                                    f"method (found: {found}).")
        t = load_file(path)
        with open(os.path.join(folder, LABELS_FILE), encoding="utf-8") as fh:
            labels = json.load(fh)
        probe = cls(t["coef"], t["intercept"], t["scaler_mean"], t["scaler_scale"], labels)
        k = probe.coef.shape[0]
        if k != (1 if len(labels) == 2 else len(labels)) or probe.coef.shape[1] != probe.mean.shape[0]:
            raise ValueError(f"{path}: coef {tuple(probe.coef.shape)} does not fit {len(labels)} labels and "
                             f"{probe.mean.shape[0]} features; the folder's files do not belong together.")
        return probe


def fit_probe(features: torch.Tensor, labels: torch.Tensor, label_names: list[str], *, C: float = 1.0,
              max_iter: int = 1000, class_weight: str | None = None) -> LinearProbe:
    """Standardise `features` (N, H) and fit a logistic regression to class ids `labels` (N,) in 0..K-1."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise ConfigError(f"The features method fits scikit-learn's LogisticRegression, and scikit-learn is not "
                          f"installed. Install it with: {SKLEARN_PIP}") from None
    K = len(label_names)
    y = labels.to(torch.long).numpy()
    present = set(y.tolist())
    missing = [label_names[c] for c in range(K) if c not in present]
    if missing:
        raise ConfigError(f"The training rows have no example of label(s) {missing}; a classifier cannot learn a "
                          f"class it never sees. Add rows of those labels, or drop them from data.labels.")
    X = features.to(torch.float64).numpy()
    scaler = StandardScaler().fit(X)
    reg = LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight)
    reg.fit(scaler.transform(X), y)
    return LinearProbe(coef=torch.from_numpy(reg.coef_.copy()), intercept=torch.from_numpy(reg.intercept_.copy()),
                       mean=torch.from_numpy(scaler.mean_.copy()), scale=torch.from_numpy(scaler.scale_.copy()),
                       labels=list(label_names), n_iter=int(max(reg.n_iter_)))
