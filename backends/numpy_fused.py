"""NumPy fast path: the blocked pipelines of :mod:`._blocked` (full result) and
:mod:`._gradient` (gradient only).

``calibrate`` writes every intermediate into a preallocated output or a
block-sized workspace (in-place ufuncs, ``out=``), so a call allocates only
its outputs plus a few block buffers. ``calibrate_gradient`` writes only the
gradient, with segment reductions by ``np.add.reduceat`` inside each block.
Both decline (raise :class:`~bogc_core._types.Decline`) float16 and other
dtypes, empty inputs, and options whose evidence the dtype cannot represent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from bogc_core._types import Calibration, CalibrationConfig, Decline
from bogc_core.errors import ConfigError, DTypeError, ShapeError

from ._blocked import Ops, decline_reason, hugepage_buffer, run_blocked
from ._gradient import NumpyShim, gradient

__all__ = [
    "NAME",
    "NumpyOps",
    "accepts",
    "calibrate",
    "calibrate_gradient",
    "BLOCK",
    "GRADIENT_BLOCK",
    "set_threads",
]

NAME = "numpy-fused"
# 16 Ki elements: a few such float64 buffers fit in a 1-2 MiB L2 cache.
BLOCK = 1 << 14
# The gradient engine keeps ~10 float64 temporaries of a block live.
GRADIENT_BLOCK = 1 << 15
_THREADS = [1]


def set_threads(n: int) -> None:
    """Threads for :func:`calibrate_gradient` on NumPy arrays (default 1, NumPy's own habit)."""
    if not (isinstance(n, int) and n >= 1):
        raise ConfigError(f"n: must be an int >= 1, got {n!r}")
    _THREADS[0] = n


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

    def count_zero(self, x):
        return int(x.size - np.count_nonzero(x))

    def count_not_normal(self, x, tiny):
        return int(np.count_nonzero(x < tiny) + np.count_nonzero(x == np.inf))

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
    """NumPy arrays (any dtype: :func:`calibrate` declines what it cannot take)."""
    return bool(array_api_compat.is_numpy_namespace(space.xp))


def calibrate(
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
) -> Calibration:
    """The full :class:`Calibration` of one group, on validated float32/float64 inputs."""
    dtype = np.dtype(space.dtype)
    # 1/Q for Q = 0 and 1/(1 + inf) are intended (they give B = 0 and U = 0).
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        return run_blocked(NumpyOps(dtype), NAME, space, names, stats, lambdas, config, BLOCK)


def flat_counts(stats: Sequence[Any], shape: tuple[int, ...]) -> list[Any]:
    """Per source a Python float (one count) or the flat per-dimension counts."""
    out: list[Any] = []
    for s in stats:
        c = np.asarray(s.count)
        out.append(float(c.reshape(-1)[0]) if c.size == 1 else np.broadcast_to(c, shape).reshape(-1))
    return out


def check_gradient_call(
    space: Any, stats: Sequence[Any], config: CalibrationConfig, segments: Sequence[int] | None, out: Any
) -> tuple[tuple[int, ...], int]:
    """Shared checks of every ``calibrate_gradient``: shape, ``segments``, ``out``; (shape, D)."""
    # The gradient engine works in float64, so evidence beyond the input
    # dtype's range (clip, prior_weight) is no reason to decline here.
    problem = decline_reason(space, stats, None)
    if problem:
        raise Decline(problem)
    shape = tuple(int(v) for v in stats[0].shape)
    D = math.prod(shape)
    if segments is not None:
        if len(shape) != 1:
            raise ShapeError(
                f"segments: given, so the statistics must be one-dimensional (D,); got shape "
                f"{shape}; flatten them, or pass segments=None"
            )
        lengths = [int(n) for n in segments]
        if not lengths or any(n < 1 for n in lengths) or sum(lengths) != D:
            raise ShapeError(
                f"segments: must be positive lengths summing to D={D}; got {lengths}"
            )
    if out is not None:
        if tuple(out.shape) != shape:
            raise ShapeError(f"out: shape {tuple(out.shape)} does not match the statistics' {shape}")
        if out.dtype != stats[0].mean.dtype:
            raise DTypeError(
                f"out: dtype {out.dtype} differs from the statistics' {stats[0].mean.dtype}; "
                f"pass an output of the same dtype"
            )
    return shape, D


def calibrate_gradient(
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
    *,
    out: Any = None,
    segments: Sequence[int] | None = None,
    diagnostics: dict[str, Any] | None = None,
) -> Any:
    """``calibrate(...).gradient`` alone, per segment (module :mod:`._gradient`).

    ``out``: a NumPy array of the statistics' shape and dtype that receives
    the gradient (returned); it is written only after every check passed.
    """
    shape, D = check_gradient_call(space, stats, config, segments, out)
    dtype = np.dtype(space.dtype)
    target = np.empty(shape, dtype=dtype) if out is None else out
    copy_back = not target.flags.c_contiguous
    flat = np.empty(D, dtype=dtype) if copy_back else target.reshape(-1)
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        gradient(
            NumpyShim(),
            names,
            [np.reshape(s.mean, (-1,)) for s in stats],
            [np.reshape(s.m2, (-1,)) for s in stats],
            flat_counts(stats, shape),
            lambdas,
            config,
            flat,
            segments,
            GRADIENT_BLOCK,
            space.tiny,
            dtype == np.float32,
            diagnostics,
            threads=_THREADS[0],
        )
    if copy_back:
        target[...] = flat.reshape(shape)
    if diagnostics is not None:
        diagnostics["path"] = NAME
    return target
