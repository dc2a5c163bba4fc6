"""Host-side scalars of the engine's passes, shared by the array engine (:mod:`._gradient`)
and its compiled loops (:mod:`._numba_kernel`): per source and segment, a handful of floats."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LOG10_RANGE", "MAX32", "TINY32", "fast32_fits", "reference", "score_consts", "zero_variance_sources"]

# The power form r^p K is taken only while |log10| of every factor keeps the
# product inside float64's normal range with a margin.
LOG10_RANGE = 290.0
TINY32 = float(np.finfo(np.float32).smallest_normal)
MAX32 = float(np.finfo(np.float32).max)


def score_consts(prior: Any, counts: Sequence[Any], tiny: float) -> np.ndarray:
    """``C_k = log(alpha_n) + log(kappa_n)``, the scalar part of source ``k``'s log score
    for one count ``n`` (0 for per-dimension counts, whose logs are taken per dimension)."""
    return np.asarray([math.log(max(prior.alpha0 + 0.5 * n, tiny)) + math.log(max(prior.kappa0 + n, tiny))
                       if isinstance(n, float) else 0.0 for n in counts])


def reference(sums: np.ndarray, cnts: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``ref_g`` ``(G,)``: the mean finite log score of each segment, from the sums of
    ``l - C_k`` and the numbers of finite scores, ``(S, G)`` each."""
    return np.sum(sums + C[:, None] * cnts, axis=0) / np.maximum(np.sum(cnts, axis=0), 1.0)


def fast32_fits(p: float, lk: np.ndarray, L: float, W: float) -> bool:
    """The power form in float32 arithmetic, as the reference's own: ``t = |mu| / (sqrt(beta)
    K^(-1/p))``, then ``e = clip(t)^p``. An over- or underflow of ``t`` lands on the clip
    bound it would reach anyway, given that every scalar (``K = exp(lk)``, the clip bounds,
    ``W``) is a normal float32 number, which this tests."""
    tiny, big, m = TINY32, MAX32, float(np.abs(lk).max())
    return (p * 65.0 + m / math.log(10.0) < LOG10_RANGE and m / p < 15.0 * math.log(10.0)
            and L / p < math.log(big) - 1.0 and tiny < math.exp(-L) / W
            and math.exp(L) / W < big and tiny < W < big)


def zero_variance_sources(names: Sequence[str], zero_var: np.ndarray, prior: Any) -> list[str]:
    """The sources whose ``M2`` is zero in some segment (the empirical-Bayes prior only)."""
    return [n for n, z in zip(names, zero_var) if prior.beta0 is None and bool(z.any())]
