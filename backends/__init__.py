"""Fast paths of the calibration pipeline, one module per array library.

Importing this package imports nothing: the core imports a fast-path module
by name, on demand, once it knows the array type (a NumPy call never imports
PyTorch or CuPy). Every module has the same protocol:

- ``NAME``: the fast path's name (``CalibrationConfig(backend=NAME)``);
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
import importlib.util
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


# ---- Legacy: registration with the old bogc_core.dispatch, which imports this
# package and expects it to fill its registry. Lazy proxies, so that no array
# library is imported here. A core with the by-type dispatcher
# (bogc_core._dispatch) imports the modules itself: then nothing registers.
# Delete this block once no supported core lacks bogc_core._dispatch.
def _legacy_register() -> None:
    import array_api_compat

    from bogc_core import dispatch
    from bogc_core._types import Decline

    checks = {
        "numpy": array_api_compat.is_numpy_namespace,
        "torch": array_api_compat.is_torch_namespace,
        "cupy": array_api_compat.is_cupy_namespace,
    }
    names = {
        "numpy_fused": "numpy-fused",
        "torch_fused": "torch-fused",
        "torch_compiled": "torch-compiled",
        "cupy_fused": "cupy-fused",
    }
    for lib, mods in MODULES.items():
        for mod in mods:

            def accepts(space: Any, _lib: str = lib, _mod: str = mod) -> bool:
                return bool(checks[_lib](space.xp)) and bool(load(_mod).accepts(space))

            def runner(space: Any, names_: Any, stats: Any, lam: Any, cfg: Any, _mod: str = mod) -> Any:
                try:
                    return load(_mod).calibrate(space, names_, stats, lam, cfg)
                except Decline as d:
                    return d.reason

            dispatch.register(names[mod], accepts, runner)


if (
    importlib.util.find_spec("bogc_core._dispatch") is None
    and importlib.util.find_spec("bogc_core.dispatch") is not None
):
    _legacy_register()
