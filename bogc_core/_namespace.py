"""The one place that resolves the array namespace, dtype and device.

Every public function of the core calls :func:`resolve` on its array inputs
and then works only through the returned namespace ``xp`` (the Array API
standard, via ``array_api_compat``), so NumPy, PyTorch, CuPy, JAX and
array-api-strict arrays all take the same code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat

from .errors import DTypeError, NamespaceError, NonFiniteError, ShapeError

__all__ = []


@dataclass(frozen=True)
class Space:
    """Namespace, floating dtype and device shared by a set of arrays."""

    xp: Any
    dtype: Any
    device: Any

    @property
    def tiny(self) -> float:
        """Smallest positive normal number of the dtype (docs/method.md#evidence)."""
        return float(self.xp.finfo(self.dtype).smallest_normal)

    @property
    def eps(self) -> float:
        return float(self.xp.finfo(self.dtype).eps)

    @property
    def max(self) -> float:
        return float(self.xp.finfo(self.dtype).max)

    def asarray(self, value: Any) -> Any:
        """``value`` as an array of this space (a copy is never forced)."""
        return self.xp.asarray(value, dtype=self.dtype, device=self.device)

    def full(self, shape: tuple[int, ...], value: float) -> Any:
        return self.xp.full(shape, value, dtype=self.dtype, device=self.device)

    def all_finite(self, x: Any) -> bool:
        """Whether ``x`` has no NaN or inf: one min and one max (both propagate NaN),
        cheaper than materialising ``isfinite(x)``."""
        xp = self.xp
        if math.prod(x.shape) == 0:
            return True
        return bool(xp.isfinite(xp.min(x)) & xp.isfinite(xp.max(x)))


def _is_float(xp: Any, dtype: Any) -> bool:
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except (AttributeError, TypeError):  # pragma: no cover - very old namespaces
        return dtype in (xp.float32, xp.float64)


def resolve(*arrays: Any, names: tuple[str, ...] | None = None) -> Space:
    """Check that ``arrays`` share one namespace, device and real floating dtype.

    ``names`` (one per array) are used in error messages. Python scalars are not
    accepted here: callers convert them with :meth:`Space.asarray` afterwards.
    """
    names = names or tuple(f"array {i}" for i in range(len(arrays)))
    xps = []
    for name, a in zip(names, arrays):
        try:
            xps.append(array_api_compat.array_namespace(a))
        except TypeError as exc:
            raise NamespaceError(
                f"{name}: expected an array of an Array API library (NumPy, PyTorch, CuPy, "
                f"JAX, array-api-strict), got {type(a).__name__}; wrap it with that library's "
                f"asarray first"
            ) from exc
    xp = xps[0]
    for name, other in zip(names[1:], xps[1:]):
        if other is not xp:
            raise NamespaceError(
                f"{name}: arrays come from different libraries ({_ns_name(xp)} and "
                f"{_ns_name(other)}); convert all inputs to one array library"
            )
    dev = array_api_compat.device(arrays[0])
    for name, a in zip(names[1:], arrays[1:]):
        if array_api_compat.device(a) != dev:
            raise NamespaceError(
                f"{name}: arrays live on different devices ({dev} and "
                f"{array_api_compat.device(a)}); move all inputs to one device"
            )
    dtype = arrays[0].dtype
    for name, a in zip(names, arrays):
        if not _is_float(xp, a.dtype):
            raise DTypeError(
                f"{name}: dtype {a.dtype} is not real floating; cast gradients to float32 or "
                f"float64"
            )
        if a.dtype != dtype:
            raise DTypeError(
                f"{name}: mixed dtypes {dtype} and {a.dtype}; cast all inputs to one floating "
                f"dtype"
            )
    return Space(xp=xp, dtype=dtype, device=dev)


def _ns_name(xp: Any) -> str:
    return getattr(xp, "__name__", repr(xp))


def broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """NumPy broadcasting of two shapes, or ``None`` if they do not broadcast."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))


def check_finite(space: Space, x: Any, name: str) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` if ``x`` holds NaN or inf."""
    if not space.all_finite(x):
        raise NonFiniteError(
            f"{name}: contains NaN or infinite values; check the loss for overflow (lower the "
            f"learning rate, enable gradient scaling/unscaling before calibration) or drop the "
            f"offending batch"
        )


def check_same_shape(shape: tuple[int, ...], expected: tuple[int, ...], name: str) -> None:
    if tuple(shape) != tuple(expected):
        raise ShapeError(
            f"{name}: shape {tuple(shape)} does not match {tuple(expected)}; every source's "
            f"statistics must have the shape of the parameter they describe"
        )
