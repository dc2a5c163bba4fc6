"""Accuracy, macro-F1, and the statistics of a paired comparison with a baseline.

Every interval and p-value comes from ``scipy.stats``:

- :func:`paired_difference`: mean of ``a_i - b_i`` over paired seeds with the
  Student-t interval ``mean +- t_{(1+level)/2, n-1} sd / sqrt(n)``
  (``scipy.stats.t``), the two-sided paired t-test p-value
  (``scipy.stats.ttest_rel``) and the minimum detectable effect of that test;
- :func:`min_detectable_effect`: the smallest true mean difference the paired
  t-test detects with the given power, from the exact noncentral-t power
  (``scipy.stats.nct``);
- :func:`example_bootstrap`: a paired bootstrap over test examples of the
  per-example difference in correctness, averaged over seeds
  (``scipy.stats.bootstrap``, percentile interval);
- :func:`holm`: Holm's step-down adjustment of a table's p-values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.optimize
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


def t_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample (paired) t-test at true mean ``effect``, spread ``sd``.

    With ``df = n - 1``, ``c = t_{1-alpha/2, df}`` and noncentrality
    ``lam = effect sqrt(n) / sd``: ``P(T' > c) + P(T' < -c)``, ``T' ~ nct(df, lam)``.
    """
    df = n - 1
    return _power(effect * math.sqrt(n) / sd, float(scipy.stats.t.ppf(1 - alpha / 2, df)), df)


def _power(lam: float, c: float, df: int) -> float:
    # P(T' < -c | lam) is written as P(T' > c | -lam): scipy's nct.cdf returns NaN where that
    # tail underflows (df = 1, lam around 15-25), its sf returns 0
    return float(scipy.stats.nct.sf(c, df, lam) + scipy.stats.nct.sf(c, df, -lam))


def min_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The true mean difference ``delta > 0`` at which the paired t-test over ``n`` pairs with
    spread ``sd`` (sample sd of the differences, taken as the true one) has ``power``.

    Solves ``t_power(delta, sd, n, alpha) = power`` (:func:`t_power`, exact noncentral t) by
    bracketing the noncentrality ``lam = delta sqrt(n) / sd``. For large ``n`` it tends to
    ``(z_{1-alpha/2} + z_{power}) sd / sqrt(n)``. NaN for ``n < 2``; 0 for ``sd = 0``.
    """
    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0.0:
        return 0.0
    df = n - 1
    c = float(scipy.stats.t.ppf(1 - alpha / 2, df))

    def gap(lam: float) -> float:
        return _power(lam, c, df) - power

    hi = max(1.0, 2 * c)
    while gap(hi) < 0:  # power rises with lam; df = 1 needs lam far above c
        hi *= 2
    lam = scipy.optimize.brentq(gap, 0.0, hi, xtol=1e-10, rtol=1e-12)
    return float(lam * sd / math.sqrt(n))


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of ``a_i - b_i`` over paired runs, its Student-t interval, the paired t-test p-value
    and ``mde``, the minimum detectable effect at 80 % power and alpha 0.05
    (:func:`min_detectable_effect`, from the sample sd ``sd`` of the differences).

    NaN bounds, p and mde for ``n < 2``. A zero spread (up to rounding: every pair
    differs by the same amount) leaves the t-test without an estimate of the noise: a
    zero-width interval at the mean, ``p = 1`` if the mean is 0 (no pair differs), else
    an undefined (NaN) p, and an undefined mde. The t-test's limit ``p -> 0`` is not
    used: a few seeds that differ by the same few test examples are no evidence of a
    noiseless difference.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = d.size
    m = float(d.mean())
    if n < 2:
        return {"mean": m, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "n": n,
                "sd": math.nan, "mde": math.nan}
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(m)):
        return {"mean": m, "ci_low": m, "ci_high": m, "p": 1.0 if m == 0 else math.nan, "n": n,
                "sd": 0.0, "mde": math.nan}
    lo, hi = scipy.stats.t.interval(level, n - 1, loc=m, scale=sd / math.sqrt(n))
    p = float(scipy.stats.ttest_rel(np.asarray(a, float), np.asarray(b, float)).pvalue)
    return {"mean": m, "ci_low": float(lo), "ci_high": float(hi), "p": p, "n": n, "sd": sd,
            "mde": min_detectable_effect(sd, n, alpha=1 - level)}


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
