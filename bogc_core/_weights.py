"""Stage 5a: the fused weights ``w[S, *shape]``, per dimension, summing to 1 over sources
(docs/method.md#calibrated-update). Not to be confused with the fixed source
weights ``lambda_k`` (the ``source_weights=`` argument of ``calibrate``).


- ``"evidence"``: ``w_k = e_k / sum_j e_j``.
- ``"dempster"``: source k's share of the fused belief when each term
  ``prod_{j in A} b_j prod_{j not in A} u_j`` of its expansion is split equally
  among the members of ``A``. Because ``b_j + u_j = 1`` the terms are the
  probabilities of a Poisson-binomial count, and with ``M_{-k}`` the number of
  *other* sources that "believe"::

      w_k = b_k * E[1 / (1 + M_{-k})] / B,   E[1/(1+M)] = int_0^1 prod_{j != k} (u_j + b_j t) dt

  The integrand is a polynomial of degree ``S - 1``, so Gauss-Legendre with
  ``ceil(S/2)`` nodes is exact: ``O(S^2)`` work instead of ``2^S`` subsets.
- ``"uniform"``: ``1/S`` (ablation).
"""

from __future__ import annotations

import functools
import math

from ._namespace import resolve
from ._types import WEIGHTS, Array
from .errors import ConfigError

__all__ = ["fused_weights"]

@functools.cache
def gauss_legendre01(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes and weights of ``n``-point Gauss-Legendre quadrature on ``[0, 1]``.

    Pure Python (Newton on the Legendre recurrence) so the core needs no
    NumPy-only call; exact for polynomials of degree ``<= 2n - 1``.
    """
    nodes, wts = [], []
    for i in range(1, n + 1):
        x = math.cos(math.pi * (i - 0.25) / (n + 0.5))
        for _ in range(100):
            p0, p1 = 1.0, x
            for j in range(2, n + 1):
                p0, p1 = p1, ((2 * j - 1) * x * p1 - (j - 1) * p0) / j
            dp = n * (x * p1 - p0) / (x * x - 1.0) if n > 1 else 1.0
            dx = p1 / dp
            x -= dx
            if abs(dx) < 1e-16:
                break
        p0, p1 = 1.0, x
        for j in range(2, n + 1):
            p0, p1 = p1, ((2 * j - 1) * x * p1 - (j - 1) * p0) / j
        dp = n * (x * p1 - p0) / (x * x - 1.0) if n > 1 else 1.0
        nodes.append(0.5 * (x + 1.0))
        wts.append(1.0 / ((1.0 - x * x) * dp * dp))  # 2/((1-x^2)P'^2), halved for [0, 1]
    return tuple(nodes), tuple(wts)


def _dempster(b: Array, u: Array, fused_belief: Array) -> Array:
    xp = resolve(b).xp
    S = b.shape[0]
    if S == 1:
        return xp.ones_like(b)
    nodes, wts = gauss_legendre01((S + 1) // 2)
    share = xp.zeros_like(b)
    for t, w in zip(nodes, wts):
        factors = u + b * t  # >= t > 0 because u + b = 1
        prod = xp.prod(factors, axis=0)
        share = share + w * (prod / factors)
    return b * share / fused_belief


def fused_weights(
    kind: str, e: Array, b: Array = None, u: Array = None, fused_belief: Array = None
) -> Array:
    """Fused weights ``w[S, *shape]`` of kind ``kind`` from evidence ``e[S, *shape]``.

    ``"dempster"`` also needs the per-source beliefs ``b``, uncertainties ``u``
    (both ``[S, *shape]``) and the fused belief ``B[*shape]``.
    """
    xp = resolve(e, names=("e",)).xp
    if kind == "evidence":
        return e / xp.sum(e, axis=0)
    if kind == "uniform":
        return xp.ones_like(e) / e.shape[0]
    if kind == "dempster":
        if b is None or u is None or fused_belief is None:
            raise ConfigError("weights='dempster': needs b, u and fused_belief")
        return _dempster(b, u, fused_belief)
    raise ConfigError(f"weights: must be one of {WEIGHTS}, got {kind!r}")

