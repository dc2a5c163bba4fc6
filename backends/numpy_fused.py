"""NumPy fused path: the chunked pipeline of :mod:`._chunked` with in-place ufuncs.

Every operation writes into a preallocated output or a chunk-sized
workspace (``out=``), so a call allocates only its outputs plus a few
chunk buffers, and each chunk's intermediates stay in the CPU cache instead
of the reference's ``(S, D)`` temporaries going through memory. NumPy runs
one thread and has little per-call overhead, so on one core it is about as
fast as the PyTorch path (``docs/backends.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from bogc_core._types import Calibration, CalibrationConfig
from bogc_core.dispatch import register

from ._chunked import Ops, hugepage_buffer, run_chunked

__all__ = ["NAME", "NumpyOps", "run", "accepts", "CHUNK"]

NAME = "numpy-fused"
# 16 Ki elements: a few such float64 buffers fit in a 1-2 MiB L2 cache.
CHUNK = 1 << 14


class NumpyOps(Ops):
    def __init__(self, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)

    def empty(self, shape):
        return np.empty(shape, dtype=self.dtype)

    def empty_output(self, shape):
        n = int(np.prod(shape))
        mm = hugepage_buffer(n * self.dtype.itemsize)
        if mm is None:
            return self.empty(shape)
        return np.frombuffer(mm, dtype=self.dtype, count=n).reshape(shape)

    def flat(self, x):
        return np.reshape(x, (-1,))

    def flat_count(self, count, shape):
        return np.reshape(np.broadcast_to(count, shape), (-1,))

    def numel(self, x):
        return int(np.size(x))

    def item(self, x):
        return float(np.reshape(x, (-1,))[0])

    def reshape(self, x, shape):
        return np.reshape(x, shape)

    def acc_sum(self, acc, x):
        return acc + float(np.sum(x))

    def min_float(self, x):
        return float(np.min(x))

    def sum_float(self, x):
        return float(np.sum(x))

    def finite_sum(self, x):
        ok = np.isfinite(x)
        return float(np.sum(x, where=ok)), float(np.count_nonzero(ok))

    def copy(self, x, out):
        np.copyto(out, x)
        return out

    def fill(self, out, value):
        out.fill(value)
        return out

    def add(self, a, b, out):
        return np.add(a, b, out=out)

    def mul(self, a, b, out):
        return np.multiply(a, b, out=out)

    def div(self, a, b, out):
        return np.divide(a, b, out=out)

    def rdiv(self, a, b, out):
        return np.divide(a, b, out=out)

    def addcmul(self, acc, a, b, value, tmp):
        np.multiply(a, b, out=tmp)
        if value != 1.0:
            np.multiply(tmp, value, out=tmp)
        return np.add(acc, tmp, out=acc)

    def axpy(self, acc, x, alpha, tmp):
        np.multiply(x, alpha, out=tmp)
        return np.add(acc, tmp, out=acc)

    def affine(self, x, scale, shift, out):
        if scale == 1.0:  # the default snr, gamma = 0.5
            return np.add(x, shift, out=out)
        np.multiply(x, scale, out=out)
        return np.add(out, shift, out=out)

    def clamp(self, x, lo, hi, out):
        if lo is not None and hi is not None:
            return np.clip(x, lo, hi, out=out)
        if lo is not None:
            return np.maximum(x, lo, out=out)
        return np.minimum(x, hi, out=out)

    def abs(self, x, out):
        return np.abs(x, out=out)

    def sqrt(self, x, out):
        return np.sqrt(x, out=out)

    def recip(self, x, out):
        return np.reciprocal(x, out=out)

    def log(self, x, out):
        return np.log(x, out=out)

    def exp(self, x, out):
        return np.exp(x, out=out)

    def ge(self, x, value, out):
        return np.greater_equal(x, value, out=out, casting="unsafe")


def accepts(space: Any) -> bool:
    return bool(array_api_compat.is_numpy_namespace(space.xp))


def run(
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
) -> Calibration | str:
    """Runner for :func:`bogc_core.dispatch.register` (float32/float64 NumPy arrays)."""
    dtype = np.dtype(space.dtype)
    # run_chunked declines (decline_reason) anything but float32/float64.
    # 1/Q for Q = 0 and 1/(1 + inf) are intended (they give B = 0 and U = 0).
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        return run_chunked(NumpyOps(dtype), NAME, space, names, stats, lambdas, config, CHUNK)


register(NAME, accepts, run)
