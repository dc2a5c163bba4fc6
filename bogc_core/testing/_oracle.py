"""The float64 oracle: an independent, deliberately plain NumPy transcription
of docs/method.md.

It shares no code with the rest of ``bogc_core``: float64 throughout, direct
formulas (no log-domain tricks, no quadrature), and brute force over subsets
and over the power set where the method defines a quantity that way. The
tests and ``bogc validate`` compare the library, on every namespace, with
these functions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "LOG_1E6",
    "stats_of",
    "sample_stats",
    "posterior",
    "dempster_shares_bruteforce",
    "calibrate",
    "calibrate_samples",
    "OracleResult",
    "dempster_full",
    "dempster_power_set",
    "masses",
]

LOG_1E6 = math.log(1e6)


def sample_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, m, M2)`` of samples ``x[n, *shape]``, with ``n`` broadcast to the shape."""
    n = np.full(x.shape[1:], float(x.shape[0]))
    m = x.mean(axis=0)
    return n, m, ((x - m) ** 2).sum(axis=0)


def stats_of(samples: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    n = samples.shape[0]
    m = samples.mean(axis=0)
    return float(n), m, ((samples - m) ** 2).sum(axis=0)


def posterior(n, m, m2, mu0=0.0, kappa0=0.0, alpha0=1.0, beta0=None):
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), m.shape)
    if beta0 is None:
        ok = n >= 2
        beta0 = alpha0 * np.mean(m2[ok] / n[ok])
    kappa = kappa0 + n
    mu = (kappa0 * mu0 + n * m) / kappa
    alpha = alpha0 + n / 2
    beta = beta0 + m2 / 2 + kappa0 * n * (m - mu0) ** 2 / (2 * kappa)
    return mu, kappa, alpha, beta


def dempster_shares_bruteforce(b: np.ndarray) -> np.ndarray:
    """Source shares of the fused belief by enumerating every non-empty subset A."""
    S = b.shape[0]
    u = 1.0 - b
    share = np.zeros_like(b)
    for r in range(1, S + 1):
        for A in itertools.combinations(range(S), r):
            term = np.ones_like(b[0])
            for j in range(S):
                term = term * (b[j] if j in A else u[j])
            for k in A:
                share[k] += term / r
    return share / (1.0 - np.prod(u, axis=0))


def calibrate(
    sources,
    gamma=0.5,
    evidence_from="snr",
    W=1.0,
    prior=None,
    weights="evidence",
    scale="belief",
    s_max=None,
    clip=LOG_1E6,
    lambdas=None,
):
    """``sources`` is a list of ``(n, m, m2)``; returns ``(g, w, U, s, e)``."""
    prior = prior or {}
    S = len(sources)
    posts = [posterior(n, m, m2, **prior) for n, m, m2 in sources]
    # a source with zero pooled variance (and the empirical-Bayes prior) has
    # infinite precision everywhere: the whole group gets equal evidence
    zero_var = prior.get("beta0") is None and any(not np.any(np.asarray(m2) > 0) for _, _, m2 in sources)
    q = []
    for mu, kappa, alpha, beta in posts:
        with np.errstate(divide="ignore"):
            tau = alpha * kappa / beta
        q.append(tau * mu**2 if evidence_from == "snr" else tau)
    q = np.array(q)
    pos = q > 0
    # geometric mean over sources and dimensions of the positive scores;
    # q = 0 (a mean of exactly 0) has zero reliability: minimum evidence
    q_ref = np.exp(np.mean(np.log(q[pos]))) if pos.any() else 1.0
    with np.errstate(divide="ignore"):
        e = np.exp(np.clip(gamma * np.log(q / q_ref), -clip, clip)) if gamma > 0 else np.ones_like(q)
    if zero_var:
        e = np.ones_like(e)
    b = e / (e + W)
    u = W / (e + W)
    U = np.prod(u, axis=0)
    B = 1.0 - U
    if weights == "evidence":
        w = e / e.sum(axis=0)
    elif weights == "uniform":
        w = np.full_like(e, 1.0 / S)
    else:
        w = dempster_shares_bruteforce(b)
    s = B / B.mean() if scale == "belief" else np.ones_like(B)
    if s_max is not None:
        s = np.minimum(s, s_max)
    lam = np.ones(S) if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    mus = np.array([p[0] for p in posts])
    g = s * S * np.einsum("k...,k,k...->...", w, lam, mus)
    return g, w, U, s, e


def dempster_full(b1: np.ndarray, u1: float, b2: np.ndarray, u2: float):
    """Dempster's rule over the power set of K singletons (masses on singletons and the frame)."""
    K = len(b1)
    # One element beyond the K singletons keeps the frame distinct from {0}
    # when K = 1 (a binomial opinion); for K >= 2 it changes no intersection.
    frame = frozenset(range(K + 1))

    def masses(b, u):
        m = {frozenset([i]): b[i] for i in range(K)}
        m[frame] = m.get(frame, 0.0) + u
        return m

    m1, m2 = masses(b1, u1), masses(b2, u2)
    out: dict[frozenset, float] = {}
    for A, x in m1.items():
        for B_, y in m2.items():
            C = A & B_
            out[C] = out.get(C, 0.0) + x * y
    conflict = out.pop(frozenset(), 0.0)
    norm = 1.0 - conflict
    belief = np.array([out.get(frozenset([i]), 0.0) / norm for i in range(K)])
    return belief, out.get(frame, 0.0) / norm, conflict


@dataclass
class OracleResult:
    gradient: np.ndarray
    weights: np.ndarray
    uncertainty: np.ndarray
    belief_scale: np.ndarray
    evidence: np.ndarray


def calibrate_samples(
    samples: Sequence[np.ndarray], cfg: Any, lambdas: Sequence[float] | None = None
) -> OracleResult:
    """:func:`calibrate` of raw samples ``x_k[n_k, *shape]`` with the options of a
    ``CalibrationConfig`` ``cfg`` (read as plain attributes)."""
    p = cfg.prior
    prior = dict(mu0=p.mu0, kappa0=p.kappa0, alpha0=p.alpha0, beta0=p.beta0)
    g, w, U, s, e = calibrate(
        [sample_stats(np.asarray(x, dtype=np.float64)) for x in samples],
        gamma=cfg.gamma,
        evidence_from=cfg.evidence_from,
        W=cfg.prior_weight,
        prior=prior,
        weights=cfg.weights,
        scale=cfg.scale,
        s_max=cfg.s_max,
        clip=cfg.clip,
        lambdas=lambdas,
    )
    return OracleResult(g, w, U, s, e)


def dempster_power_set(mass_list: list[dict[frozenset[int], float]]) -> dict[frozenset[int], float]:
    """Dempster's rule over the full power set, one-shot for any number of sources;
    the conflict is returned under the empty set."""
    combined: dict[frozenset[int], float] = {}
    for focal in itertools.product(*[list(m.items()) for m in mass_list]):
        inter = frozenset.intersection(*[f for f, _ in focal])
        combined[inter] = combined.get(inter, 0.0) + math.prod(v for _, v in focal)
    conflict = combined.pop(frozenset(), 0.0)
    return {a: v / (1.0 - conflict) for a, v in combined.items()} | {frozenset(): conflict}


def masses(b: np.ndarray, u: float) -> dict[frozenset[int], float]:
    """Masses on the singletons ``{i}`` and on the frame.

    The frame gets one extra element that carries no singleton mass (the
    complement of the K propositions), so that with K = 1 the frame differs
    from the singleton, as in the one-proposition opinions of the method; for
    K >= 2 it changes no intersection and hence no combined mass.
    """
    K = len(b)
    m = {frozenset([i]): float(b[i]) for i in range(K)}
    m[frozenset(range(K + 1))] = float(u)
    return m
