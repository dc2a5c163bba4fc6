"""An independent, deliberately plain NumPy transcription of METHOD.md.

It shares no code with ``bogc_core``: float64 throughout, direct formulas
(no log-domain tricks, no quadrature), and brute force over subsets and over
the power set where METHOD.md defines a quantity that way. Tests compare the
library, on every namespace, with these functions.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

LOG_1E6 = math.log(1e6)


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
    q = []
    for mu, kappa, alpha, beta in posts:
        tau = alpha * kappa / beta
        q.append(tau * mu**2 if evidence_from == "snr" else tau)
    q = np.array(q)
    pos = q > 0
    # geometric mean over sources and dimensions of the positive scores;
    # q = 0 (a mean of exactly 0) has zero reliability: minimum evidence
    q_ref = np.exp(np.mean(np.log(q[pos]))) if pos.any() else 1.0
    with np.errstate(divide="ignore"):
        e = np.exp(np.clip(gamma * np.log(q / q_ref), -clip, clip)) if gamma > 0 else np.ones_like(q)
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
