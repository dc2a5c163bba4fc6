"""Accuracy, macro-F1, and the statistics of a paired comparison with a baseline.

Every interval and p-value comes from ``scipy.stats``:

- :func:`paired_difference`: mean of ``a_i - b_i`` over paired seeds with the
  Student-t interval ``mean +- t_{(1+level)/2, n-1} sd / sqrt(n)``
  (``scipy.stats.t``) and the two-sided paired t-test p-value
  (``scipy.stats.ttest_rel``);
- :func:`example_bootstrap`: a paired bootstrap over test examples of the
  per-example difference in correctness, averaged over seeds
  (``scipy.stats.bootstrap``, percentile interval);
- :func:`holm`: Holm's step-down adjustment of a table's p-values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of ``y_pred == y_true`` (both ``(n,)``)."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean over classes of ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``.

    Classes absent from both ``y_true`` and ``y_pred`` are left out of the mean.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    f1 = []
    for c in range(n_classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of ``a_i - b_i`` over paired runs, its Student-t interval and paired t-test p-value.

    NaN bounds and p for ``n < 2``; a zero spread (up to rounding) gives a
    zero-width interval and ``p = 1`` if the mean is 0, else an undefined (NaN) p.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = d.size
    m = float(d.mean())
    if n < 2:
        return {"mean": m, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "n": n}
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(m)):
        # every pair differs by the same amount (up to rounding): the t statistic is undefined
        return {"mean": m, "ci_low": m, "ci_high": m, "p": 1.0 if m == 0 else math.nan, "n": n}
    lo, hi = scipy.stats.t.interval(level, n - 1, loc=m, scale=sd / math.sqrt(n))
    p = float(scipy.stats.ttest_rel(np.asarray(a, float), np.asarray(b, float)).pvalue)
    return {"mean": m, "ci_low": float(lo), "ci_high": float(hi), "p": p, "n": n}


def example_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, level: float = 0.95,
                      n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap over test examples of the accuracy difference ``a - b``.

    ``correct_*``: ``(seeds, n_test)`` booleans, paired by seed and example.
    Per example, the difference in correctness is averaged over seeds; the
    examples are resampled with replacement (``scipy.stats.bootstrap``,
    percentile interval). Returns the mean and the interval.
    """
    d = (np.asarray(correct_a, float) - np.asarray(correct_b, float)).mean(axis=0)
    m = float(d.mean())
    if np.all(d == d[0]):
        return {"mean": m, "ci_low": m, "ci_high": m}
    res = scipy.stats.bootstrap((d,), np.mean, confidence_level=level, n_resamples=n_resamples,
                                method="percentile", random_state=np.random.default_rng(seed))
    return {"mean": m, "ci_low": float(res.confidence_interval.low),
            "ci_high": float(res.confidence_interval.high)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN, excluded from the count).

    With the ``m`` finite p-values sorted, ``p_(1) <= ... <= p_(m)``:
    ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
