"""Choice of a fast path for :func:`~bogc_core.calibrate`, by array type, on demand.

A *fast path* is a module (in the ``bogc_core.backends`` package) that
computes the same result as the Array API reference for one array library.
:data:`FAST_PATHS` names them as strings, per library; nothing is imported
until an array of that library reaches :func:`~bogc_core.calibrate`, so a
NumPy call never imports PyTorch or CuPy. The array's library is read from its
type (``type(x).__module__``), which needs no import either (the einops and
array-api-compat approach); the choice is cached per type.

A fast-path module provides ``NAME``, ``accepts(space) -> bool``,
``calibrate(space, names, stats, lambdas, config) -> Calibration`` and
``calibrate_gradient(space, names, stats, lambdas, config, *, out=None,
segments=None, diagnostics=None) -> array``, and declines an input by raising
:class:`~bogc_core.Decline`; the reference then runs and the reason is
recorded as ``"<name>: <reason>"`` under ``diagnostics["fallback"]``. A module
that fails to import although its library is present raises
:class:`~bogc_core.FastPathError`.

:func:`register_fast_path` adds a fast path from outside the table (a *runner* with the
signature of ``calibrate``; returning a ``str`` instead of raising
:class:`Decline` is accepted too, as a reason to decline).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from ._types import Array, Calibration, CalibrationConfig, Decline
from .errors import ConfigError, FastPathError

if TYPE_CHECKING:
    from ._namespace import Space
    from ._statistics import GradientStats

__all__ = ["fast_paths", "register_fast_path"]

#: Fast paths per array library (the top-level module of the array's type), in
#: priority order: ``library -> ((name, module), ...)``.
FAST_PATHS: dict[str, tuple[tuple[str, str], ...]] = {
    "numpy": (("numpy-fused", "bogc_core.backends.numpy_fused"),),
    "torch": (("torch-fused", "bogc_core.backends.torch_fused"),),
    "cupy": (("cupy-fused", "bogc_core.backends.cupy_fused"),),
}

Runner = Callable[
    ["Space", Sequence[str], Sequence["GradientStats"], Sequence[float], CalibrationConfig],
    "Calibration | str",
]

# Fast paths given to register_fast_path(): name -> (accepts, runner).
_REGISTRY: dict[str, tuple[Callable[[Space], bool], Runner]] = {}
# type -> library name (or "" for a library without fast paths).
_LIBRARY_OF_TYPE: dict[type, str] = {}
_LOADED: dict[str, FastPath] = {}


def register_fast_path(
    name: str, accepts: Callable[[Space], bool], runner: Runner
) -> None:
    """Add the fast path ``name`` for the spaces where ``accepts(space)`` holds.

    ``runner(space, names, stats, lambdas, config)`` returns a
    :class:`~bogc_core.Calibration`, or declines by raising
    :class:`~bogc_core.Decline` (a returned ``str`` is read as a decline too).
    """
    if not isinstance(name, str) or not name or name in ("auto", "reference"):
        raise ConfigError(f"name: must be a non-empty str other than 'auto'/'reference', got {name!r}")
    _REGISTRY[name] = (accepts, runner)
    _LOADED.pop(name, None)



@dataclass(frozen=True)
class FastPath:
    """One loaded fast path: the protocol functions, whatever form the module takes."""

    name: str
    accepts: Callable[[Space], bool]
    run: Callable[..., Calibration | str]
    run_gradient: Callable[..., Array] | None

    def calibrate(
        self,
        space: Space,
        names: Sequence[str],
        stats: Sequence[GradientStats],
        lambdas: Sequence[float],
        config: CalibrationConfig,
    ) -> Calibration:
        """The module's ``calibrate``; raises :class:`Decline` to decline."""
        result = self.run(space, names, stats, lambdas, config)
        if isinstance(result, str):
            raise Decline(result)
        return result


def _from_module(name: str, module: ModuleType) -> FastPath:
    if callable(getattr(module, "calibrate", None)):
        return FastPath(
            str(getattr(module, "NAME", name)),
            module.accepts,
            module.calibrate,
            getattr(module, "calibrate_gradient", None),
        )
    raise FastPathError(
        f"fast_path: module {module.__name__} does not define calibrate(); reinstall bogc, "
        f"or pass fast_path='reference'"
    )


def _load(name: str) -> FastPath:
    """The fast path ``name``, importing its module on first use."""
    if name in _LOADED:
        return _LOADED[name]
    module_name = next(
        (mod for entries in FAST_PATHS.values() for n, mod in entries if n == name), None
    )
    if module_name is None:
        accepts, runner = _REGISTRY[name]
        fp = FastPath(name, accepts, runner, None)
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any failure here is a broken install
            raise FastPathError(
                f"fast_path: {name!r} ({module_name}) failed to import although its array "
                f"library is installed: {type(exc).__name__}: {exc}; reinstall bogc (or the "
                f"library), or pass fast_path='reference' to run without it"
            ) from exc
        fp = _from_module(name, module)
    _LOADED[name] = fp
    return fp


def _library(x: Array) -> str:
    """The library of ``x``'s type that has fast paths, or ``""`` (cached per type)."""
    t = type(x)
    lib = _LIBRARY_OF_TYPE.get(t)
    if lib is None:
        lib = ""
        for klass in t.__mro__:
            top = (getattr(klass, "__module__", "") or "").split(".", 1)[0]
            if top in FAST_PATHS:
                lib = top
                break
        _LIBRARY_OF_TYPE[t] = lib
    return lib


def available() -> list[str]:
    """Names of the fast paths whose array library is installed, and registered ones.

    Nothing is imported: a library counts as installed when it can be found.
    """
    names = [
        name
        for lib, entries in FAST_PATHS.items()
        if lib in _installed()
        for name, _ in entries
    ]
    return names + [n for n in _REGISTRY if n not in names]


fast_paths = available


def _installed() -> set[str]:
    out = set()
    for lib in FAST_PATHS:
        try:
            if importlib.util.find_spec(lib) is not None:
                out.add(lib)
        except (ImportError, ValueError):  # pragma: no cover - broken metadata
            pass
    return out


def choose(space: Space, example: Array, config: CalibrationConfig) -> FastPath | None:
    """The fast path for ``example``'s array type and ``config.fast_path``, or ``None``
    for the reference.

    ``"auto"``: the first fast path of the library whose
    ``accepts(space)`` holds, then paths given to :func:`register_fast_path`; ``None``
    if there is none. A name: that path, or :class:`ConfigError` if it does
    not exist or does not accept the input.
    """
    want = config.fast_path
    if want == "reference":
        return None
    lib = _library(example)
    if want == "auto":
        for name, _ in FAST_PATHS.get(lib, ()):
            fp = _load(name)
            if fp.accepts(space):
                return fp
        for name in list(_REGISTRY):
            if any(name == n for entries in FAST_PATHS.values() for n, _ in entries):
                continue
            fp = _load(name)
            if fp.accepts(space):
                return fp
        return None
    known = [n for entries in FAST_PATHS.values() for n, _ in entries] + [
        n for n in _REGISTRY if n not in {m for e in FAST_PATHS.values() for m, _ in e}
    ]
    if want not in known:
        raise ConfigError(
            f"fast_path: {want!r} is not available; choose 'auto', 'reference' or one of "
            f"{available()}"
        )
    table_lib = next((lb for lb, entries in FAST_PATHS.items() if any(n == want for n, _ in entries)), None)
    if table_lib is not None and table_lib != lib:
        raise ConfigError(
            f"fast_path: {want!r} is for {table_lib} arrays, not {lib or type(example).__name__}; "
            f"use fast_path='auto' or 'reference'"
        )
    fp = _load(want)
    if not fp.accepts(space):
        raise ConfigError(
            f"fast_path: {want!r} does not accept {getattr(space.xp, '__name__', space.xp)} "
            f"arrays on {space.device}; use fast_path='auto' or 'reference'"
        )
    return fp
