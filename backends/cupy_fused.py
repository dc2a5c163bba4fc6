"""CuPy fused path: the per-dimension pipeline as CUDA kernels, one pass per group reduction.

Kernels (``T`` is float or double; every formula is the reference's, in the
same order, so results agree to round-off):

A. ``cupy.sum(M2)`` per source (empirical-Bayes ``vbar`` and the
   zero-variance test); with per-dimension counts a ``ReductionKernel`` sums
   ``M2/n`` and counts the dimensions with ``n >= 2``.
B. Two ``ReductionKernel`` s per source recompute the log score
   ``l = log(alpha) + log(kappa) - log(beta) [+ 2 log|mu|]`` from
   ``(n, m, M2)`` and return the sum and the number of its finite entries
   (``ref``); nothing is written.
C. One ``ElementwiseKernel`` generated for the number of sources and the
   options recomputes ``l`` for every source, then ``e``, the fused belief
   and uncertainty (``log1p``/``expm1`` as in the reference), the weights
   (``evidence``, ``uniform`` or ``dempster`` with the exact Gauss-Legendre
   rule) and ``S * sum_k w_k lambda_k mu_k``; it writes ``e, w, U, B, g'``.
   ``cupy.sum(B)`` gives ``mean(B)``.
D. One ``ElementwiseKernel`` turns ``B`` into ``s = B/mean(B)`` (clipped at
   ``s_max``) in place and multiplies the gradient by it.

Recomputing ``l`` in C costs arithmetic, which a GPU has to spare, instead of
an ``(S, D)`` write and read.

``calibrate_gradient`` runs the gradient engine of :mod:`._gradient` on CuPy
arrays, one block per call (whole-array kernels; segment sums by
``cupyx.scatter_add``). Not yet run on a GPU: ``benchmarks/gpu_check.sh``
runs its tests and benchmark on a CUDA machine.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import array_api_compat
import cupy as cp
import cupyx
import numpy as np

from bogc_core._types import Calibration, CalibrationConfig, Decline

from ._adapter import Adapter
from ._gradient import FEW_SAMPLES, Shim, gauss_legendre01

__all__ = ["NAME", "accepts", "calibrate", "calibrate_gradient", "CupyShim"]

NAME = "cupy-fused"

_PREAMBLE = r"""
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
_score_sum = cp.ReductionKernel(
    _SCORE_ARGS,
    "float64 out",
    "bogc_finite_score(n, m, m2, beta0, alpha0, kappa0, mu0, tiny, snr)",
    "a + b",
    "out = a",
    "0",
    "bogc_score_sum",
    preamble=_PREAMBLE,
)
_score_count = cp.ReductionKernel(
    _SCORE_ARGS,
    "float64 out",
    "bogc_finite_count(n, m, m2, beta0, alpha0, kappa0, mu0, tiny, snr)",
    "a + b",
    "out = a",
    "0",
    "bogc_score_count",
    preamble=_PREAMBLE,
)
# Empirical Bayes with per-dimension counts: sum of M2/n and number of terms over n >= 2.
_eb_sum = cp.ReductionKernel(
    "T n, T m2",
    "float64 out",
    "n >= (T)2 ? (double)m2 / (double)n : 0.0",
    "a + b",
    "out = a",
    "0",
    "bogc_eb_sum",
)
_eb_count = cp.ReductionKernel(
    "T n",
    "float64 out",
    "n >= (T)2 ? 1.0 : 0.0",
    "a + b",
    "out = a",
    "0",
    "bogc_eb_count",
)
_scale = cp.ElementwiseKernel(
    "T mean_b, T s_max, int32 clip_s",
    "T s, T g",
    "T v = s / mean_b; if (clip_s) v = min(v, s_max); s = v; g = v * g;",
    "bogc_belief_scale",
)


@functools.lru_cache(maxsize=64)
def _fuse_kernel(S: int, weights: str) -> cp.ElementwiseKernel:
    """Stage 2-5 kernel for ``S`` sources: writes ``e_k, w_k, U, B`` and ``S * sum_k w_k lam_k mu_k``."""
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
    return cp.ElementwiseKernel(
        ins, outs, "\n".join(body), f"bogc_fuse_{S}_{weights}", preamble=_PREAMBLE
    )


def _full(
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
) -> Calibration:
    """The full result (float32/float64 CuPy arrays, checked by :func:`._adapter.run`)."""
    dtype = np.dtype(space.dtype)
    shape = tuple(stats[0].shape)
    D, S = math.prod(shape), len(stats)
    tiny = space.tiny
    T = dtype.type
    prior = config.prior
    counts = [T(float(s.count.reshape(-1)[0])) if s.count.size == 1 else s.count for s in stats]

    beta0s, zero_var = [], []
    for name, s, n in zip(names, stats, counts, strict=False):
        if prior.beta0 is not None:
            beta0s.append(float(prior.beta0))
            continue
        if isinstance(n, cp.ndarray):
            n_b = cp.broadcast_to(n, shape)
            n_valid = float(_eb_count(n_b))
            if not n_valid > 0:
                raise Decline(FEW_SAMPLES)
            vbar = float(_eb_sum(n_b, s.m2)) / n_valid
        else:
            if not float(n) >= 2:
                raise Decline(FEW_SAMPLES)
            vbar = float(cp.sum(s.m2, dtype=cp.float64)) / float(n) / D
        beta0s.append(float(prior.alpha0) * vbar)
        if not bool(cp.any(s.m2 > 0)):
            zero_var.append(name)

    common = (T(prior.alpha0), T(prior.kappa0), T(prior.mu0), T(tiny))
    snr = np.int32(config.evidence_from == "snr")
    flat = bool(zero_var) or config.gamma == 0
    ref = 0.0
    if not flat:
        total = count = 0.0
        for s, n, b0 in zip(stats, counts, beta0s, strict=False):
            # Scalars as 0-d device arrays: reductions broadcast their inputs.
            scal = [cp.asarray(v) for v in (n, T(b0)) + common + (snr,)]
            sargs = (scal[0], s.mean, s.m2) + tuple(scal[1:])
            total += float(_score_sum(*sargs))
            count += float(_score_count(*sargs))
        ref = total / max(count, 1.0)

    E = cp.empty((S,) + shape, dtype=dtype)
    Wt = cp.empty((S,) + shape, dtype=dtype)
    U = cp.empty(shape, dtype=dtype)
    Bs = cp.empty(shape, dtype=dtype)
    G = cp.empty(shape, dtype=dtype)
    args: list[Any] = []
    for s, n, b0, lam in zip(stats, counts, beta0s, lambdas, strict=False):
        args += [n, s.mean, s.m2, T(b0), T(lam)]
    args += [T(ref), T(config.gamma), T(config.clip), T(config.prior_weight)] + list(common)
    args += [snr, np.int32(flat)]
    outs = [E[k] for k in range(S)] + [Wt[k] for k in range(S)] + [U, Bs, G]
    _fuse_kernel(S, config.weights)(*args, *outs)

    if config.scale == "belief":
        mean_b = float(cp.sum(Bs, dtype=cp.float64)) / D
        s_max = config.s_max
        _scale(
            T(mean_b), T(s_max if s_max is not None else 0.0), np.int32(s_max is not None), Bs, G
        )
    else:
        Bs.fill(1)
    flags = {"path": NAME, "zero_variance_sources": zero_var}
    return Calibration(G, Wt, U, Bs, E, names, float(config.prior_weight), flags)



class CupyShim(Shim):
    """The gradient engine's operations on CuPy arrays (one block per call)."""

    xp = cp

    def work(self, x: Any) -> Any:
        return cp.asarray(x, dtype=cp.float64)

    def segsum(self, x: Any, offsets: Any) -> Any:
        counts = np.diff(np.append(offsets, x.shape[0]))
        ids = cp.asarray(np.repeat(np.arange(offsets.size), counts))
        acc = cp.zeros(offsets.size, dtype=cp.float64)
        cupyx.scatter_add(acc, ids, cp.asarray(x, dtype=cp.float64))
        return acc

    def expand(self, vals: Any, counts: Any) -> Any:
        ids = cp.asarray(np.repeat(np.arange(len(counts)), counts))
        return vals[ids]

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return cp.zeros(shape, dtype=cp.float64)

    def index(self, x: np.ndarray) -> Any:
        return x  # host layout: segsum/expand build their device indices from it

    def asarray(self, x: Any) -> Any:
        return cp.asarray(x, dtype=cp.float64)

    def store(self, dst: Any, src: Any) -> None:
        dst[...] = src

    def to_host(self, x: Any) -> np.ndarray:
        return cp.asnumpy(x)


def _identity(x: Any) -> Any:
    return x


class CupyAdapter(Adapter):
    """The engine for ``calibrate_gradient``; the full result runs the CUDA kernels."""

    name = NAME

    def accepts(self, space: Any) -> bool:
        return bool(array_api_compat.is_cupy_namespace(space.xp))

    def engine(self, space: Any, native: bool) -> tuple[Shim, Any, int, int]:
        return CupyShim(), _identity, 1 << 62, 1

    def empty(self, space: Any, shape: tuple[int, ...], output: bool = False) -> Any:
        return cp.empty(shape, dtype=space.dtype)

    def contiguous(self, x: Any) -> bool:
        return bool(x.flags.c_contiguous)

    kernels = staticmethod(_full)


ADAPTER = CupyAdapter()
accepts = ADAPTER.accepts
calibrate = ADAPTER.calibrate
calibrate_gradient = ADAPTER.calibrate_gradient
