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

The kernel sources are in :mod:`._cuda_kernels` (importable without CuPy),
which the ``nvcc`` and ``cuda_host`` tests compile and run without a GPU.

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

from . import _cuda_kernels as cuda
from ._adapter import Adapter
from ._gradient import FEW_SAMPLES, Shim

__all__ = ["NAME", "accepts", "calibrate", "calibrate_gradient", "CupyShim"]

NAME = "cupy-fused"


def _reduction(k: cuda.Reduction) -> cp.ReductionKernel:
    return cp.ReductionKernel(
        k.in_params,
        k.out_params,
        k.map_expr,
        k.reduce_expr,
        k.post_map_expr,
        k.identity,
        k.name,
        preamble=k.preamble,
    )


def _elementwise(k: cuda.Elementwise) -> cp.ElementwiseKernel:
    return cp.ElementwiseKernel(k.in_params, k.out_params, k.operation, k.name, preamble=k.preamble)


_score_sum = _reduction(cuda.SCORE_SUM)
_score_count = _reduction(cuda.SCORE_COUNT)
_eb_sum = _reduction(cuda.EB_SUM)
_eb_count = _reduction(cuda.EB_COUNT)
_scale = _elementwise(cuda.SCALE)


@functools.lru_cache(maxsize=64)
def _fuse_kernel(S: int, weights: str) -> cp.ElementwiseKernel:
    """Stage 2-5 kernel for ``S`` sources (:func:`._cuda_kernels.fuse`)."""
    return _elementwise(cuda.fuse(S, weights))


def _full(space: Any, names: Sequence[str], stats: Sequence[Any], lambdas: Sequence[float],
          config: CalibrationConfig) -> Calibration:
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
