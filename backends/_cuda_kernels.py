"""CUDA sources of the ``cupy-fused`` kernels, as data: importable without CuPy.

Each kernel is the argument list of the CuPy class that compiles it
(``cupy.ReductionKernel`` or ``cupy.ElementwiseKernel``): parameter lists in
CuPy's notation (``T`` is the statistics' dtype, float or double; ``int32``
and ``float64`` are fixed types), the loop body or the map/reduce/post-map
expressions, and the device functions of :data:`PREAMBLE`. ``cupy_fused``
builds the CuPy objects from these; ``tests/backends/test_cuda_kernels.py``
compiles the same text with nvcc and runs it on the CPU with g++.

Kernels (every formula is the reference's, in the same order):

- :data:`SCORE_SUM`, :data:`SCORE_COUNT` (reductions): sum and number of the
  finite log scores ``l = log(alpha) + log(kappa) - log(beta) [+ 2 log|mu|]``
  of one source, recomputed from ``(n, m, M2)``; their quotient is ``ref``.
- :data:`EB_SUM`, :data:`EB_COUNT` (reductions): ``sum M2/n`` and the number
  of dimensions with ``n >= 2``, for the empirical-Bayes ``vbar`` with
  per-dimension counts.
- :func:`fuse` (elementwise, generated for ``S`` sources and the weights
  kind): every source's score again, then ``e``, the fused belief
  ``B = 1 - prod_k (1 + e_k/W)^-1`` and ``U`` (``log1p``/``expm1``), the
  weights and ``G = S sum_k w_k lambda_k mu_k``.
- :data:`SCALE` (elementwise): ``s = B / mean(B)`` (clipped at ``s_max``) in
  place of ``B``, and ``g = s G`` in place of ``G``.

:func:`full` launches them in order for the full result, through two launch
functions: CuPy's compiled kernels in ``cupy_fused``, the g++ build on NumPy
arrays in the tests, so that the tests run the orchestration a GPU runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bogc_core._types import CalibrationConfig, Decline

from ._gradient import FEW_SAMPLES, gauss_legendre01

__all__ = ["PREAMBLE", "WEIGHTS", "Elementwise", "Reduction", "SCORE_SUM", "SCORE_COUNT", "EB_SUM",
           "EB_COUNT", "SCALE", "fuse", "full"]

#: The weights kinds :func:`fuse` generates code for.
WEIGHTS = ("evidence", "uniform", "dempster")


@dataclass(frozen=True)
class Reduction:
    """The arguments of ``cupy.ReductionKernel`` (one output, reduced over every axis)."""

    name: str
    in_params: str
    out_params: str
    map_expr: str
    reduce_expr: str
    post_map_expr: str
    identity: str
    preamble: str = ""


@dataclass(frozen=True)
class Elementwise:
    """The arguments of ``cupy.ElementwiseKernel``."""

    name: str
    in_params: str
    out_params: str
    operation: str
    preamble: str = ""


PREAMBLE = r"""
__device__ __forceinline__ float bogc_neginf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double bogc_neginf(double) {
    return __longlong_as_double(0xfff0000000000000ULL);
}

// Posterior mean mu and log score l of one (source, dimension): docs/method.md
// Stages 1-2 exactly as bogc_core.posterior / bogc_core.evidence compute them.
template <typename T>
__device__ __forceinline__ void bogc_score(
    T n, T m, T m2, T beta0, T alpha0, T kappa0, T mu0, T tiny, int snr, T& mu, T& l) {
    T kappa = kappa0 + n;
    T alpha = alpha0 + (T)0.5 * n;
    T beta;
    if (kappa0 == (T)0) {
        mu = m;
        beta = beta0 + (T)0.5 * m2;
    } else {
        T d = m - mu0;
        mu = (kappa0 * mu0 + n * m) / kappa;
        beta = beta0 + (T)0.5 * m2 + (kappa0 * n / ((T)2 * kappa)) * (d * d);
    }
    l = log(max(alpha, tiny)) + log(max(kappa, tiny)) - log(max(beta, tiny));
    if (snr) {
        T a = fabs(mu);
        l = (a == (T)0) ? bogc_neginf(a) : l + (T)2 * log(a);
    }
}

template <typename T>
__device__ __forceinline__ double bogc_finite_score(
    T n, T m, T m2, T beta0, T alpha0, T kappa0, T mu0, T tiny, int snr) {
    T mu, l;
    bogc_score(n, m, m2, beta0, alpha0, kappa0, mu0, tiny, snr, mu, l);
    return isfinite(l) ? (double)l : 0.0;
}

template <typename T>
__device__ __forceinline__ double bogc_finite_count(
    T n, T m, T m2, T beta0, T alpha0, T kappa0, T mu0, T tiny, int snr) {
    T mu, l;
    bogc_score(n, m, m2, beta0, alpha0, kappa0, mu0, tiny, snr, mu, l);
    return isfinite(l) ? 1.0 : 0.0;
}
"""

_SCORE_ARGS = "T n, T m, T m2, T beta0, T alpha0, T kappa0, T mu0, T tiny, int32 snr"

SCORE_SUM = Reduction(
    "bogc_score_sum",
    _SCORE_ARGS,
    "float64 out",
    "bogc_finite_score(n, m, m2, beta0, alpha0, kappa0, mu0, tiny, snr)",
    "a + b",
    "out = a",
    "0",
    PREAMBLE,
)
SCORE_COUNT = Reduction(
    "bogc_score_count",
    _SCORE_ARGS,
    "float64 out",
    "bogc_finite_count(n, m, m2, beta0, alpha0, kappa0, mu0, tiny, snr)",
    "a + b",
    "out = a",
    "0",
    PREAMBLE,
)
# Empirical Bayes with per-dimension counts: sum of M2/n and number of terms over n >= 2.
EB_SUM = Reduction(
    "bogc_eb_sum",
    "T n, T m2",
    "float64 out",
    "n >= (T)2 ? (double)m2 / (double)n : 0.0",
    "a + b",
    "out = a",
    "0",
)
EB_COUNT = Reduction(
    "bogc_eb_count",
    "T n",
    "float64 out",
    "n >= (T)2 ? 1.0 : 0.0",
    "a + b",
    "out = a",
    "0",
)
SCALE = Elementwise(
    "bogc_belief_scale",
    "T mean_b, T s_max, int32 clip_s",
    "T s, T g",
    "T v = s / mean_b; if (clip_s) v = min(v, s_max); s = v; g = v * g;",
)


@functools.lru_cache(maxsize=64)
def fuse(S: int, weights: str) -> Elementwise:
    """Stages 2-5 for ``S`` sources: writes ``e_k, w_k, U, B`` and ``S * sum_k w_k lam_k mu_k``.

    Inputs per source ``k``: ``n{k}, m{k}, v{k}`` (count, mean, M2), ``b0{k}``
    (its ``beta0``) and ``lam{k}``; then ``ref, gamma, L`` (clip), ``W`` (prior
    weight), the prior, ``tiny``, ``snr`` and ``flat`` (evidence 1 everywhere).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights: one of {WEIGHTS}, got {weights!r}")
    ins = ", ".join(f"T n{k}, T m{k}, T v{k}, T b0{k}, T lam{k}" for k in range(S))
    ins += ", T ref, T gamma, T L, T W, T alpha0, T kappa0, T mu0, T tiny, int32 snr, int32 flat"
    outs = ", ".join(
        [f"T e{k}" for k in range(S)] + [f"T w{k}" for k in range(S)] + ["T U, T B, T G"]
    )
    body = [f"T ev[{S}]; T mu[{S}]; T l;"]
    for k in range(S):
        body.append(
            f"bogc_score(n{k}, m{k}, v{k}, b0{k}, alpha0, kappa0, mu0, tiny, snr, mu[{k}], l);"
            # gamma = 0 (and the zero-variance fallback) give e = 1 even where l = -inf.
            f"{{ T z = (flat || gamma == (T)0) ? (T)0 : gamma * (l - ref);"
            f"   ev[{k}] = exp(min(max(z, -L), L)); e{k} = ev[{k}]; }}"
        )
    body.append("T log_u = (T)0;")
    for k in range(S):
        body.append(f"log_u -= log1p(ev[{k}] / W);")
    body.append("T Bv = -expm1(log_u); U = exp(log_u); B = Bv;")
    body.append(f"T w[{S}];")
    if weights == "evidence":
        body.append("T tot = ev[0];" + "".join(f"tot = tot + ev[{k}];" for k in range(1, S)))
        body += [f"w[{k}] = ev[{k}] / tot;" for k in range(S)]
    elif weights == "uniform":
        body += [f"w[{k}] = (T)1 / (T){S};" for k in range(S)]
    elif S == 1:
        body.append("w[0] = (T)1;")
    else:  # dempster: bogc_core.weights._dempster, Gauss-Legendre exact for degree S - 1
        nodes, gws = gauss_legendre01((S + 1) // 2)
        body.append(f"T bb[{S}], uu[{S}], sh[{S}], f[{S}];")
        for k in range(S):
            body.append(
                f"bb[{k}] = ev[{k}] / (ev[{k}] + W); uu[{k}] = W / (ev[{k}] + W); sh[{k}] = (T)0;"
            )
        for t, gw in zip(nodes, gws, strict=False):
            body.append("{ T P = (T)1;")
            for k in range(S):
                body.append(f"f[{k}] = uu[{k}] + bb[{k}] * (T){t!r}; P = P * f[{k}];")
            for k in range(S):
                body.append(f"sh[{k}] = sh[{k}] + (T){gw!r} * (P / f[{k}]);")
            body.append("}")
        body += [f"w[{k}] = bb[{k}] * sh[{k}] / Bv;" for k in range(S)]
    body += [f"w{k} = w[{k}];" for k in range(S)]
    body.append("T acc = w[0] * lam0 * mu[0];")
    body += [f"acc = acc + w[{k}] * lam{k} * mu[{k}];" for k in range(1, S)]
    body.append(f"G = (T){S} * acc;")
    return Elementwise(f"bogc_fuse_{S}_{weights}", ins, outs, "\n".join(body), PREAMBLE)


def full(xp: Any, reduce: Callable[..., float], elementwise: Callable[..., None],
         names: Sequence[str], stats: Sequence[Any], lambdas: Sequence[float],
         config: CalibrationConfig, tiny: float) -> tuple[Any, ...]:
    """The full result ``(G, W, U, B, E, zero_variance_sources)`` from the kernels.

    ``xp``: the arrays' module (``cupy``, or ``numpy`` for the host build);
    ``reduce(kernel, *inputs) -> float`` and ``elementwise(kernel, *args)`` launch a
    kernel of this module; ``stats``: ``(count, mean, m2)`` of each source, float32 or
    float64 arrays of one shape; ``tiny``: the dtype's smallest normal number.
    Stages: A. ``vbar`` and the zero-variance test per source (a plain sum of ``M2``,
    or :data:`EB_SUM` / :data:`EB_COUNT` with per-dimension counts); B. ``ref``
    (:data:`SCORE_SUM` / :data:`SCORE_COUNT` over every source); C. :func:`fuse`;
    D. :data:`SCALE` with ``mean(B)``. Raises :class:`Decline` where the reference
    raises (fewer than 2 samples).
    """
    dtype, shape = stats[0].mean.dtype, tuple(stats[0].mean.shape)
    D, S, T = math.prod(shape), len(stats), np.dtype(dtype).type
    prior = config.prior
    counts = [T(float(s.count.reshape(-1)[0])) if s.count.size == 1 else s.count for s in stats]

    beta0s, zero_var = [], []
    for name, s, n in zip(names, stats, counts):
        if prior.beta0 is not None:
            beta0s.append(float(prior.beta0))
            continue
        if isinstance(n, xp.ndarray):
            n_b = xp.broadcast_to(n, shape)
            n_valid = reduce(EB_COUNT, n_b)
            if not n_valid > 0:
                raise Decline(FEW_SAMPLES)
            vbar = reduce(EB_SUM, n_b, s.m2) / n_valid
        else:
            if not float(n) >= 2:
                raise Decline(FEW_SAMPLES)
            vbar = float(xp.sum(s.m2, dtype=xp.float64)) / float(n) / D
        beta0s.append(float(prior.alpha0) * vbar)
        if not bool(xp.any(s.m2 > 0)):
            zero_var.append(name)

    common = (T(prior.alpha0), T(prior.kappa0), T(prior.mu0), T(tiny))
    snr = np.int32(config.evidence_from == "snr")
    flat = bool(zero_var) or config.gamma == 0
    ref = 0.0
    if not flat:
        total = count = 0.0
        for s, n, b0 in zip(stats, counts, beta0s):
            # Scalars as 0-d arrays: reductions broadcast their inputs.
            scal = [xp.asarray(v) for v in (n, T(b0)) + common + (snr,)]
            sargs = (scal[0], s.mean, s.m2) + tuple(scal[1:])
            total += reduce(SCORE_SUM, *sargs)
            count += reduce(SCORE_COUNT, *sargs)
        ref = total / max(count, 1.0)

    E, Wt = xp.empty((S,) + shape, dtype=dtype), xp.empty((S,) + shape, dtype=dtype)
    U, Bs, G = (xp.empty(shape, dtype=dtype) for _ in range(3))
    args: list[Any] = []
    for s, n, b0, lam in zip(stats, counts, beta0s, lambdas):
        args += [n, s.mean, s.m2, T(b0), T(lam)]
    args += [T(ref), T(config.gamma), T(config.clip), T(config.prior_weight), *common, snr,
             np.int32(flat)]
    elementwise(fuse(S, config.weights), *args, *E, *Wt, U, Bs, G)
    if config.scale == "belief":
        mean_b = float(xp.sum(Bs, dtype=xp.float64)) / D
        s_max = config.s_max
        elementwise(SCALE, T(mean_b), T(0.0 if s_max is None else s_max), np.int32(s_max is not None),
                    Bs, G)
    else:
        Bs.fill(1)
    return G, Wt, U, Bs, E, zero_var
