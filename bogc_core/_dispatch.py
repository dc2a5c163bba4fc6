"""Choice of a fused fast path for :func:`~bogc_core.calibrate`.

Backends (the ``bogc_core.backends`` package) register a *runner* per array
library. A runner takes the validated inputs of :func:`calibrate` and returns
either a :class:`~bogc_core.Calibration` or a short string saying why it
declines (an unsupported option, device or dtype); the reference then runs
and the reason appears in ``diagnostics["fallback"]``. The core never imports
a backend at module level: the registry is filled on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from ._namespace import Space
    from .calibrate import Calibration, CalibrationConfig
    from .stats import GradientStats

__all__ = ["register", "available", "run_fast_path", "Runner"]

Runner = Callable[
    ["Space", Sequence[str], Sequence["GradientStats"], Sequence[float], "CalibrationConfig"],
    "Calibration | str",
]

# name -> (predicate on the Space, runner); insertion order is priority order.
_REGISTRY: dict[str, tuple[Callable[[Space], bool], Runner]] = {}
_LOADED = False


def register(name: str, accepts: Callable[[Space], bool], runner: Runner) -> None:
    """Register ``runner`` under ``name`` for the spaces where ``accepts(space)`` holds."""
    _REGISTRY[name] = (accepts, runner)


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        try:
            import bogc_core.backends  # noqa: F401  (fills the registry)
        except ImportError:  # pragma: no cover - backends are part of the package
            pass


def available() -> list[str]:
    """Names of the registered fast paths (the reference is always available)."""
    _load()
    return list(_REGISTRY)


def run_fast_path(
    space: Space,
    names: Sequence[str],
    stats: Sequence[GradientStats],
    lambdas: Sequence[float],
    config: CalibrationConfig,
) -> Calibration | None:
    """Run the chosen fast path, or the reference with the fallback reason recorded.

    Returns ``None`` when no fast path is registered for this space and
    ``config.backend == "auto"`` (plain reference, no fallback flag).
    """
    from .calibrate import reference_calibrate

    _load()
    if config.backend == "auto":
        candidates = [(n, r) for n, (acc, r) in _REGISTRY.items() if acc(space)]
        if not candidates:
            return None
    else:
        if config.backend not in _REGISTRY:
            raise ConfigError(
                f"backend: {config.backend!r} is not available; choose 'auto', 'reference' or "
                f"one of {available()}"
            )
        acc, runner = _REGISTRY[config.backend]
        if not acc(space):
            raise ConfigError(
                f"backend: {config.backend!r} does not accept {getattr(space.xp, '__name__', space.xp)} "
                f"arrays on {space.device}; use backend='auto' or 'reference'"
            )
        candidates = [(config.backend, runner)]
    name, runner = candidates[0]
    result: Any = runner(space, names, stats, lambdas, config)
    if isinstance(result, str):
        return reference_calibrate(
            names, stats, lambdas, space, config, flags={"fallback": f"{name}: {result}"}
        )
    return result
