"""Stage 0: sufficient statistics of gradient samples (docs/method.md#statistics).

A source's gradient samples ``g^(i)``, ``i = 1..n``, are summarised per
dimension by the count ``n``, the mean ``m`` and the centred sum of squares
``M2 = sum_i (g^(i) - m)^2``. Everything downstream needs only these.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ._namespace import Space, broadcast_shape, check_finite, resolve
from ._types import Array
from .errors import ConfigError, InsufficientSamplesError, NonFiniteError, ShapeError

__all__ = ["GradientStats"]


def _check_count_shape(count_shape: tuple[int, ...], mean_shape: tuple[int, ...]) -> None:
    if broadcast_shape(count_shape, mean_shape) != tuple(mean_shape):
        raise ShapeError(
            f"count: shape {tuple(count_shape)} does not broadcast to the mean's shape "
            f"{tuple(mean_shape)}; pass a scalar count or one of the mean's shape"
        )


@dataclass(frozen=True, eq=False)
class GradientStats:
    """Per-dimension sufficient statistics ``(n, m, M2)`` of one source's gradients.

    Attributes
    ----------
    count : array, shape ``()`` or broadcastable to ``mean.shape``
        Number of samples ``n`` (fractional after :meth:`decay`).
    mean : array, shape ``(*shape)``
        Sample mean ``m``.
    m2 : array, shape ``(*shape)``
        Centred sum of squares ``M2 = sum_i (g^(i) - m)^2``.

    All three share one array namespace, device and floating dtype; a Python
    scalar ``count`` is converted to a 0-d array of the mean's dtype. Instances
    are immutable and never alias-modify their inputs.
    """

    count: Array
    mean: Array
    m2: Array

    def __post_init__(self) -> None:
        space = resolve(self.mean, self.m2, names=("mean", "m2"))
        if tuple(self.m2.shape) != tuple(self.mean.shape):
            raise ShapeError(
                f"m2: shape {tuple(self.m2.shape)} differs from mean's "
                f"{tuple(self.mean.shape)}; both describe the same dimensions"
            )
        count = self.count
        if isinstance(count, bool):
            raise ConfigError(f"count: must be a number >= 0 or an array, got {count!r}")
        if isinstance(count, (int, float)):
            if count < 0:
                raise ConfigError(f"count: must be >= 0, got {count}")
            count = space.asarray(float(count))
        else:
            resolve(self.mean, count, names=("mean", "count"))
        _check_count_shape(tuple(count.shape), tuple(self.mean.shape))
        object.__setattr__(self, "count", count)

    # ------------------------------------------------------------------ basics
    @property
    def space(self) -> Space:
        return resolve(self.mean)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    @property
    def variance(self) -> Array:
        """Per-sample (population) variance ``M2 / n``; 0 where ``n == 0``."""
        xp = self.space.xp
        n = self.count
        has = n > 0
        # divide by 1 where n == 0: M2 / tiny would overflow (and warn)
        v = self.m2 / xp.where(has, n, xp.ones_like(n))
        return xp.where(has, v, xp.zeros_like(v))

    def check(self, name: str = "stats") -> None:
        """Raise a :class:`BOGCError` if any statistic is NaN or infinite, or negative.

        One min and one max per array, combined into a single flag, so a valid
        input costs one synchronisation (min/max propagate NaN, unlike a sum
        they cannot overflow).
        """
        space = self.space
        xp = space.xp
        arrays = [("mean", self.mean), ("m2", self.m2), ("count", self.count)]
        arrays = [(k, a) for k, a in arrays if math.prod(a.shape) > 0]
        lows = [xp.min(a) for _, a in arrays]
        highs = [xp.max(a) for _, a in arrays]
        flags = [~xp.isfinite(lo) | ~xp.isfinite(hi) for lo, hi in zip(lows, highs)]
        flags += [lo < 0 for (k, _), lo in zip(arrays, lows) if k != "mean"]
        if not flags or not bool(xp.any(xp.stack(flags))):
            return
        for key, a in arrays:
            check_finite(space, a, f"{name}.{key}")
        raise InsufficientSamplesError(
            f"{name}: negative count or m2; statistics must come from GradientStats "
            f"constructors (from_samples, from_sums, merge) or satisfy n >= 0, M2 >= 0"
        )

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_samples(cls, x: Array, axis: int = 0) -> GradientStats:
        """Statistics of the samples along ``axis`` of ``x`` (two-pass, stable).

        ``x`` has shape ``(..., n, ...)`` with ``n >= 1`` samples on ``axis``;
        the result has the shape of ``x`` without that axis.
        """
        space = resolve(x, names=("x",))
        xp = space.xp
        ndim = len(x.shape)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise ShapeError(f"axis: must be an int (the samples' axis), got {axis!r}")
        axis = int(axis)
        if not -ndim <= axis < ndim:
            raise ShapeError(f"axis: {axis} is out of range for x of shape {tuple(x.shape)}")
        n = x.shape[axis]
        if n == 0:
            raise InsufficientSamplesError(
                f"x: has no samples along axis {axis}; pass at least one gradient sample"
            )
        check_finite(space, x, "x")
        work = space
        if str(space.dtype).rsplit(".", 1)[-1] in ("float16", "bfloat16"):
            # Half precision holds neither M2 (overflows at |g| ~ 100) nor small
            # squared deviations: the statistics are kept in float32.
            x = xp.astype(x, xp.float32)
            work = resolve(x, names=("x",))
        m = xp.mean(x, axis=axis)
        if not work.all_finite(m):
            # the sum inside mean overflowed: average the samples scaled down
            c = work.max / n
            m = xp.mean(x / c, axis=axis) * c
        d = x - xp.expand_dims(m, axis=axis)
        # M2 >= max d^2, so d * d overflows only where M2 itself does.
        m2 = xp.sum(d * d, axis=axis)
        if not work.all_finite(m2):
            raise NonFiniteError(
                f"x: the centred sum of squares M2 of these samples exceeds the largest "
                f"{str(work.dtype).rsplit('.', 1)[-1]} number; rescale the gradients (e.g. the "
                f"loss) or use float64"
            )
        return cls(work.asarray(float(n)), m, m2)

    @classmethod
    def from_sums(
        cls, count: Array, total: Array, total_sq: Array, shift: Array = None
    ) -> GradientStats:
        """Statistics from the sums form ``(n, sum g, sum g^2)``.

        If the sums were taken of shifted samples ``g - shift`` (see
        :meth:`to_sums`), pass the same ``shift`` back. The conversion
        ``M2 = sum g^2 - (sum g)^2 / n`` loses about ``eps * n * m^2``
        absolutely when ``|m|`` is large against the standard deviation; a
        shift near the mean removes that loss. Negative round-off is clipped
        to 0.
        """
        space = resolve(total, total_sq, names=("total", "total_sq"))
        xp = space.xp
        if tuple(total.shape) != tuple(total_sq.shape):
            raise ShapeError(
                f"total_sq: shape {tuple(total_sq.shape)} differs from total's "
                f"{tuple(total.shape)}"
            )
        n = space.asarray(float(count)) if isinstance(count, (int, float)) else count
        resolve(total, n, names=("total", "count"))
        _check_count_shape(tuple(n.shape), tuple(total.shape))
        has = xp.astype(n > 0, space.dtype)
        m = total / xp.clip(n, min=space.tiny) * has
        m2 = xp.clip(total_sq - total * m, min=0.0)
        if shift is not None:
            m = m + shift
        return cls(n, m, m2)

    def to_sums(self, shift: Array = None) -> tuple[Array, Array, Array]:
        """``(n, sum g, sum g^2)``, the form that adds across processes.

        With ``shift`` (a scalar or an array of the mean's shape shared by every
        party), the sums are of ``g - shift``; pass the same ``shift`` to
        :meth:`from_sums`.
        """
        m = self.mean if shift is None else self.mean - shift
        total = self.count * m
        return self.count, total, self.m2 + total * m

    # ------------------------------------------------------------- algebra
    def merge(self, other: GradientStats) -> GradientStats:
        """Statistics of the union of both sample sets (Chan et al.; exact, order-free).

        ``n = na + nb``, ``m = ma + delta * nb / n``,
        ``M2 = M2a + M2b + delta^2 * na * nb / n`` with ``delta = mb - ma``.
        """
        if not isinstance(other, GradientStats):
            raise ShapeError(f"other: expected GradientStats, got {type(other).__name__}")
        space = resolve(self.mean, other.mean, names=("self.mean", "other.mean"))
        if self.shape != other.shape:
            raise ShapeError(
                f"other: shape {other.shape} differs from {self.shape}; merge statistics of "
                f"the same parameter only"
            )
        xp = space.xp
        n = self.count + other.count
        # nb / n, written so that an empty union (n == 0) gives 0, not NaN.
        frac = other.count / xp.clip(n, min=space.tiny) * xp.astype(n > 0, space.dtype)
        delta = other.mean - self.mean
        m = self.mean + delta * frac
        m2 = self.m2 + other.m2 + (delta * delta) * (self.count * frac)
        return GradientStats(n, m, m2)

    def decay(self, rho: float) -> GradientStats:
        """Forget old samples: ``n <- rho * n``, ``M2 <- rho * M2``, ``m`` unchanged."""
        if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
            raise ConfigError(f"rho: must be a number in [0, 1] (1 keeps everything), got {rho!r}")
        rho = float(rho)
        if not 0.0 <= rho <= 1.0:
            raise ConfigError(f"rho: must lie in [0, 1] (1 keeps everything), got {rho}")
        return GradientStats(self.count * rho, self.mean, self.m2 * rho)

    def __repr__(self) -> str:
        return f"GradientStats(shape={self.shape}, dtype={self.mean.dtype})"
