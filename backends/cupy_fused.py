"""CuPy fused path: the per-dimension pipeline as CUDA kernels, one pass per group reduction.

The full result (``calibrate``) runs the kernels of :mod:`._cuda_kernels` in the
order of its :func:`~._cuda_kernels.full`: ``sum M2`` per source, two reductions
per source for ``ref``, one elementwise kernel generated for the number of
sources and the weights (``e, w, U, B`` and the unscaled gradient, every source's
log score recomputed: arithmetic, which a GPU has to spare, instead of an
``(S, D)`` write and read), and the belief scale. Every formula is the
reference's, in the same order (``T`` is float or double). The sources import
without CuPy; the ``nvcc`` and ``cuda_host`` tests compile them and run that
same orchestration on the CPU.

``calibrate_gradient`` runs the gradient engine of :mod:`._gradient` on CuPy
arrays, one block per call (whole-array kernels; segment sums by
``cupyx.scatter_add``). Not yet run on a GPU: ``benchmarks/gpu_check.sh``
runs its tests and benchmark on a CUDA machine.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import array_api_compat
import cupy as cp
import cupyx
import numpy as np

from bogc_core._types import Calibration, CalibrationConfig

from . import _cuda_kernels as cuda
from ._adapter import Adapter, identity
from ._gradient import Shim

__all__ = ["NAME", "accepts", "calibrate", "calibrate_gradient", "CupyShim"]

NAME = "cupy-fused"


def _reduction(k: cuda.Reduction) -> cp.ReductionKernel:
    return cp.ReductionKernel(k.in_params, k.out_params, k.map_expr, k.reduce_expr,
                              k.post_map_expr, k.identity, k.name, preamble=k.preamble)


@functools.lru_cache(maxsize=64)
def _elementwise(k: cuda.Elementwise) -> cp.ElementwiseKernel:
    """The compiled kernel of a source (the same source compiles once)."""
    return cp.ElementwiseKernel(k.in_params, k.out_params, k.operation, k.name, preamble=k.preamble)


_REDUCTIONS = {k.name: _reduction(k) for k in (cuda.SCORE_SUM, cuda.SCORE_COUNT, cuda.EB_SUM,
                                                cuda.EB_COUNT)}
_elementwise(cuda.SCALE)


def _reduce(k: cuda.Reduction, *inputs: Any) -> float:
    return float(_REDUCTIONS[k.name](*inputs))


def _launch(k: cuda.Elementwise, *args: Any) -> None:
    _elementwise(k)(*args)


def _full(space: Any, names: Sequence[str], stats: Sequence[Any], lambdas: Sequence[float],
          config: CalibrationConfig) -> Calibration:
    """The full result (float32/float64 CuPy arrays, checked by :func:`._adapter.run`)."""
    G, Wt, U, Bs, E, zero_var = cuda.full(cp, _reduce, _launch, names, stats, lambdas, config,
                                          space.tiny)
    flags = {"path": NAME, "zero_variance_sources": zero_var}
    return Calibration(G, Wt, U, Bs, E, names, float(config.prior_weight), flags)


class CupyShim(Shim):
    """The gradient engine's operations on CuPy arrays (one block per call)."""

    xp = cp

    def segsum(self, x: Any, offsets: Any) -> Any:
        counts = np.diff(np.append(offsets, x.shape[0]))
        ids = cp.asarray(np.repeat(np.arange(offsets.size), counts))
        acc = cp.zeros(offsets.size, dtype=cp.float64)
        cupyx.scatter_add(acc, ids, cp.asarray(x, dtype=cp.float64))
        return acc

    def expand(self, vals: Any, counts: Any) -> Any:
        ids = cp.asarray(np.repeat(np.arange(len(counts)), counts))
        return vals[ids]

    def to_host(self, x: Any) -> np.ndarray:
        return cp.asnumpy(x)


class CupyAdapter(Adapter):
    """The engine for ``calibrate_gradient``; the full result runs the CUDA kernels."""

    name = NAME

    def accepts(self, space: Any) -> bool:
        return bool(array_api_compat.is_cupy_namespace(space.xp))

    def engine(self, space: Any, native: bool) -> tuple[Shim, Any, int, int]:
        return CupyShim(), identity, 1 << 62, 1

    kernels = staticmethod(_full)


ADAPTER = CupyAdapter()
accepts = ADAPTER.accepts
calibrate = ADAPTER.calibrate
calibrate_gradient = ADAPTER.calibrate_gradient
