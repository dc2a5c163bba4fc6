"""NumPy fast path: the engine of :mod:`._gradient` on NumPy arrays.

The engine walks the flat statistics in cache-sized blocks (in-place ufuncs,
segment sums by ``np.add.reduceat``); float32 gradients run the compiled
loops of :mod:`._numba_kernel` where numba is installed. It declines
(raises :class:`~bogc_core._types.Decline`) float16 and other dtypes, empty
inputs, and (full result) options whose evidence the dtype cannot represent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from bogc_core.errors import ConfigError

from ._adapter import BLOCK, Adapter, hugepage_buffer, identity
from ._gradient import NumpyShim, Shim

__all__ = ["GRADIENT_OPTIONS", "NAME", "accepts", "calibrate", "calibrate_gradient", "set_threads"]

NAME = "numpy-fused"
_THREADS = [1]


def set_threads(n: int) -> None:
    """Threads of the engine (compiled loops or array passes) on NumPy arrays (default 1,
    NumPy's own habit); results are bit-identical for any count. CPU tensors follow
    ``torch.get_num_threads()`` instead."""
    if not (isinstance(n, int) and n >= 1):
        raise ConfigError(f"n: must be an int >= 1, got {n!r}")
    _THREADS[0] = n


def empty_numpy(dtype: Any, shape: tuple[int, ...], output: bool) -> np.ndarray:
    """An uninitialised array; an ``output`` of 4 MiB or more on huge pages where possible."""
    dtype = np.dtype(dtype)
    n = math.prod(shape)
    mm = hugepage_buffer(n * dtype.itemsize) if output else None
    if mm is None:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(mm, dtype=dtype, count=n).reshape(shape)


class NumpyAdapter(Adapter):
    name = NAME

    def accepts(self, space: Any) -> bool:
        """NumPy arrays (any dtype: the call declines what it cannot take)."""
        return bool(array_api_compat.is_numpy_namespace(space.xp))

    def engine(self, space: Any, native: bool) -> tuple[Shim, Callable[[Any], Any], int, int]:
        return NumpyShim(), identity, BLOCK["cpu"], _THREADS[0]

    def empty(self, space: Any, shape: tuple[int, ...], output: bool = False) -> Any:
        return empty_numpy(space.dtype, shape, output)


#: What the adapter's ``calibrate_gradient`` (:func:`._adapter.run`) takes beyond the protocol.
GRADIENT_OPTIONS = ("summarize", "check_values")
ADAPTER = NumpyAdapter()
accepts = ADAPTER.accepts
calibrate = ADAPTER.calibrate
calibrate_gradient = ADAPTER.calibrate_gradient
