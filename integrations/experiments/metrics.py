"""Accuracy, macro-F1 and the paired difference to a baseline with a t confidence interval."""

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
    """Mean of ``a_i - b_i`` over paired runs and its Student-t confidence interval.

    ``ci = mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)``; NaN bounds for n < 2.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = d.size
    m = float(d.mean())
    if n < 2:
        return {"mean": m, "ci_low": math.nan, "ci_high": math.nan, "n": n}
    half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return {"mean": m, "ci_low": m - half, "ci_high": m + half, "n": n}
