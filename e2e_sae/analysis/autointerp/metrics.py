"""The scores of automated interpretability and their confidence intervals (plain numpy).

- simulation score: Pearson correlation, pooled over every scored token of every example, between
  the feature's true activations and the simulator's predicted ones (Bills et al. 2023's
  "ev_correlation_score", the score Braun et al. 2024 report);
- detection: accuracy of the scorer's yes/no calls and ROC AUC of its scores on activating vs
  non-activating contexts;
- percentile bootstrap intervals of a mean over features, and of a difference of two runs' means.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def simulation_score(
    true: Sequence[Sequence[float]], predicted: Sequence[Sequence[float]]
) -> float:
    """Pearson r between true and predicted activations, all examples' tokens pooled.

    A simulator that predicts the same value for every token carries no information: its score is
    0 (the correlation is undefined there). NaN only when the true activations are constant."""
    if len(true) != len(predicted) or any(
        len(t) != len(p) for t, p in zip(true, predicted, strict=True)
    ):
        raise ValueError("simulation_score: true and predicted differ in shape")
    t = np.concatenate([np.zeros(0), *(np.asarray(x, dtype=np.float64) for x in true)])
    p = np.concatenate([np.zeros(0), *(np.asarray(x, dtype=np.float64) for x in predicted)])
    if t.size < 2 or np.ptp(t) == 0:
        return float("nan")
    if np.ptp(p) == 0:
        return 0.0
    tc, pc = t - t.mean(), p - p.mean()
    return float((tc @ pc) / np.sqrt((tc @ tc) * (pc @ pc)))


def detection_accuracy(
    labels: Sequence[bool], scores: Sequence[float], threshold: float = 0.5
) -> float:
    """Fraction of contexts where (score > threshold) equals the label (True: activating)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    return float(np.mean((s > threshold) == y))


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Probability that a random activating context scores above a random non-activating one
    (ties count one half): the area under the ROC curve. NaN without both classes."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    # Mann-Whitney U from average ranks (ties get their mean rank).
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


_NAN3 = (float("nan"), float("nan"), float("nan"))


def _finite(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v[np.isfinite(v)]


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n] indices drawn with replacement (numpy's PCG64 generator, `seed`)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_ci(
    values: Sequence[float], seed: int = 0, n_resamples: int = 10_000, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the finite `values` and the percentile bootstrap interval
    of that mean (resampling the values with replacement). NaNs when there are no values."""
    v = _finite(values)
    if v.size == 0:
        return _NAN3
    means = v[bootstrap_indices(v.size, n_resamples, seed)].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(v.mean()), float(lo), float(hi)


def bootstrap_diff_ci(
    a: Sequence[float],
    b: Sequence[float],
    seed: int = 0,
    n_resamples: int = 10_000,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): percentile bootstrap interval of the difference of two
    independent samples' means, each resampled on its own (`b` with seed + 1)."""
    va, vb = _finite(a), _finite(b)
    if va.size == 0 or vb.size == 0:
        return _NAN3
    ma = va[bootstrap_indices(va.size, n_resamples, seed)].mean(axis=1)
    mb = vb[bootstrap_indices(vb.size, n_resamples, seed + 1)].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(ma - mb, [alpha, 1 - alpha])
    return float(va.mean() - vb.mean()), float(lo), float(hi)
