"""Fast paths of the calibration pipeline, one module per array library.

Importing this package imports nothing: the core imports a fast-path module
by name, on demand, once it knows the array type (a NumPy call never imports
PyTorch or CuPy). Every module has the same protocol:

- ``NAME``: the fast path's name (``CalibrationConfig(fast_path=NAME)``);
- ``accepts(space) -> bool``: whether it takes arrays of this namespace and device;
- ``calibrate(space, names, stats, lambdas, config) -> Calibration``;
- ``calibrate_gradient(space, names, stats, lambdas, config, *, out=None,
  segments=None, diagnostics=None) -> array``;

and declines an input by raising :class:`bogc_core._types.Decline`. Each is
tested equal to the reference in ``tests/backends``.

| module            | arrays                              |
|-------------------|-------------------------------------|
| ``numpy_fused``   | NumPy float32/float64               |
| ``torch_fused``   | PyTorch float32/float64, CPU, CUDA  |
| ``torch_compiled``| PyTorch, ``torch.compile`` (opt-in) |
| ``cupy_fused``    | CuPy float32/float64                |
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MODULES", "load"]

#: Fast-path modules by array library, in priority order.
MODULES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy_fused",),
    "torch": ("torch_fused", "torch_compiled"),
    "cupy": ("cupy_fused",),
}


def load(module: str) -> Any:
    """Import the fast-path module ``module`` (e.g. ``"torch_fused"``) of this package."""
    return importlib.import_module(f"{__name__}.{module}")
