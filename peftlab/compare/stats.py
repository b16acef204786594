"""Intervals and seed summaries for the comparison's table and plots.

Two kinds of uncertainty, reported separately:

- eval-row sampling: the eval rows are a sample of the task's inputs, so a score measured on them has an interval.
  Accuracy-type scores (a fraction of rows right: accuracy, exact match) get the 95% Wilson score interval of
  k successes in n rows (scipy.stats.binomtest(...).proportion_ci(method="wilson")):

      centre = (p + z^2 / 2n) / (1 + z^2 / n),   half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

  with p = k / n and z = 1.96; unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at k = 0.
  Means of per-row values (ROUGE-L, a token-weighted eval loss) get a 95% bootstrap interval over the rows
  (scipy.stats.bootstrap, BCa, 9,999 resamples, a fixed generator: the table is the same on every rerun).
- training randomness: `seeds: N` reruns each method with N training seeds on the same eval rows; the table shows
  the mean over seeds and their sample standard deviation. The eval-row interval of a mean over seeds is the
  interval at that mean with the same n rows (the rows are shared, so averaging seeds does not add rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9_999


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` out of `n` (scipy's implementation)."""
    from scipy.stats import binomtest

    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0; got {successes} of {n}.")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def fraction_interval(fraction: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson interval for a fraction of n rows: `fraction` * n rounded to the whole number of rows it counts
    (0.73125 of 160 is 117 rows). A mean over seeds is not a whole count; it is rounded the same way."""
    return wilson_interval(int(round(fraction * n)), n, confidence)


def bootstrap_interval(values: Sequence[float], weights: Sequence[float] | None = None,
                       confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """95% BCa bootstrap interval of the mean of per-row `values` (with `weights`: of sum(values) / sum(weights),
    rows resampled as (value, weight) pairs, e.g. per-row loss sums and token counts)."""
    import numpy as np
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_interval needs at least one row.")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    point = float(x.mean()) if w is None else float(x.sum() / w.sum())
    if x.size < 2 or (np.ptp(x) == 0 and (w is None or np.ptp(w) == 0)):
        return point, point  # every resample gives the same mean: the interval is that point (BCa would be NaN)
    data, statistic = ((x,), np.mean) if w is None else ((x, w), _ratio_of_sums)
    for method in ("BCa", "percentile"):  # BCa is NaN on some degenerate samples (e.g. two distinct values)
        res = bootstrap(data, statistic, paired=w is not None, confidence_level=confidence, method=method,
                        n_resamples=BOOTSTRAP_RESAMPLES, rng=np.random.default_rng(seed), vectorized=True)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            break
    return low, high


def _ratio_of_sums(values, weights, axis=-1):
    return values.sum(axis=axis) / weights.sum(axis=axis)


def seed_spread(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1) over seeds; None for one seed."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
