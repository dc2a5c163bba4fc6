"""Validation of the inputs shared by every calibration entry point: the sources'
statistics, the fixed source weights ``lambda_k``, the config, and the options
that the dtype cannot represent (docs/method.md#evidence).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._evidence import check_evidence_range
from ._namespace import Space, check_same_shape, resolve
from ._statistics import GradientStats
from ._types import CalibrationConfig
from .errors import ConfigError, ShapeError

__all__ = ["resolve_source_weights"]

SourceWeights = Sequence[float] | Mapping[str, float]
StatsPerSource = Sequence[GradientStats] | Mapping[str, GradientStats]

# Half-precision statistics are computed in float32: M2 and the log scores of
# float16 overflow or underflow at ordinary gradient sizes.
_HALF = ("float16", "bfloat16")


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _lambda(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ConfigError(f"source_weights[{name}]: must be a real number >= 0, got {v!r}")
    f = float(v)
    if not (math.isfinite(f) and f >= 0):
        raise ConfigError(
            f"source_weights[{name}]: must be a finite number >= 0 (a fixed weight on the "
            f"source's loss), got {v!r}"
        )
    return f


def resolve_source_weights(
    names: Sequence[str], source_weights: SourceWeights | None
) -> list[float]:
    """The fixed source weights ``lambda_k`` as floats in the order of ``names`` (default 1).

    ``source_weights`` is ``None``, a sequence with one number per source, or a
    mapping name -> number; each must be finite and ``>= 0``.
    """
    if source_weights is None:
        return [1.0] * len(names)
    if isinstance(source_weights, Mapping):
        keys = [str(k) for k in source_weights]
        missing = [n for n in names if n not in keys]
        extra = [k for k in keys if k not in names]
        if missing or extra:
            raise ShapeError(
                f"source_weights: keys must match the sources {list(names)}; missing {missing}, "
                f"unknown {extra}"
            )
        by_name = {str(k): v for k, v in source_weights.items()}
        return [_lambda(repr(n), by_name[n]) for n in names]
    if isinstance(source_weights, (str, bytes)) or not isinstance(source_weights, Sequence):
        raise ConfigError(
            f"source_weights: must be None, a sequence of numbers (one per source) or a "
            f"mapping name -> number, got {type(source_weights).__name__}"
        )
    if len(source_weights) != len(names):
        raise ShapeError(
            f"source_weights: {len(source_weights)} values for {len(names)} sources; give one "
            f"weight per source"
        )
    return [_lambda(str(i), v) for i, v in enumerate(source_weights)]


def _work_space(space: Space) -> Space:
    if _dtype_name(space.dtype) in _HALF:
        return Space(space.xp, space.xp.float32, space.device)
    return space


def _upcast(st: GradientStats, space: Space) -> GradientStats:
    xp = space.xp
    return GradientStats(
        xp.astype(st.count, space.dtype),
        xp.astype(st.mean, space.dtype),
        xp.astype(st.m2, space.dtype),
    )


def prepare_sources(
    stats_per_source: StatsPerSource,
    source_weights: SourceWeights | None = None,
    check_values: bool = True,
) -> tuple[list[str], list[GradientStats], list[float], Space]:
    """Normalise the inputs of :func:`calibrate`: ``(names, stats, lambdas, space)``
    (see :func:`_prepare`)."""
    names, stats, lambdas, space, _ = _prepare(stats_per_source, source_weights, check_values)
    return names, stats, lambdas, space


def _prepare(
    stats_per_source: StatsPerSource,
    source_weights: SourceWeights | None = None,
    check_values: bool = True,
) -> tuple[list[str], list[GradientStats], list[float], Space, Any]:
    """Normalise the inputs of :func:`calibrate`; validate shapes, namespaces and
    (with ``check_values``) values.

    Half-precision (float16, bfloat16) statistics come back converted to
    float32, with the float32 space; the last item is the input's dtype, which
    the caller casts its result back to.
    """
    if isinstance(stats_per_source, GradientStats):
        raise ShapeError(
            "stats_per_source: got a single GradientStats; pass a sequence or a mapping "
            "name -> GradientStats, one per source"
        )
    if isinstance(stats_per_source, Mapping):
        names = [str(k) for k in stats_per_source]
        stats = list(stats_per_source.values())
    elif isinstance(stats_per_source, (str, bytes)) or not isinstance(stats_per_source, Iterable):
        raise ShapeError(
            f"stats_per_source: expected a sequence or a mapping name -> GradientStats, got "
            f"{type(stats_per_source).__name__}"
        )
    else:
        stats = list(stats_per_source)
        names = [str(i) for i in range(len(stats))]
    if not stats:
        raise ShapeError("stats_per_source: empty; pass at least one source's GradientStats")
    for name, s in zip(names, stats):
        if not isinstance(s, GradientStats):
            raise ShapeError(
                f"stats_per_source[{name!r}]: expected GradientStats, got {type(s).__name__}; "
                f"build it with GradientStats.from_samples or GradientStats(count, mean, m2)"
            )
    space = resolve(
        *[s.mean for s in stats], names=tuple(f"stats_per_source[{n!r}]" for n in names)
    )
    shape = stats[0].shape
    for name, s in zip(names, stats):
        check_same_shape(s.shape, shape, f"stats_per_source[{name!r}]")
    work = _work_space(space)
    if work is not space:
        stats = [_upcast(s, work) for s in stats]
    if check_values:
        check_stats(names, stats)
    lambdas = resolve_source_weights(names, source_weights)
    return names, stats, lambdas, work, space.dtype


def check_stats(names: Sequence[str], stats: Sequence[GradientStats]) -> None:
    """The values check of every source's statistics: raise the :class:`BOGCError`
    that names the first NaN or infinite statistic, or negative count or ``M2``."""
    for name, s in zip(names, stats):
        s.check(f"stats_per_source[{name!r}]")


def check_ranges(space: Space, S: int, lambdas: Sequence[float], config: CalibrationConfig) -> None:
    """Refuse, before any work, the options that can only give non-finite results in
    ``space``'s dtype: ``clip`` and ``prior_weight`` outside the evidence range,
    ``gamma`` or a fixed source weight beyond the dtype's largest number."""
    big = space.max
    if config.gamma > big:
        raise ConfigError(
            f"gamma: {config.gamma} exceeds the largest {_dtype_name(space.dtype)} number; "
            f"use gamma <= {big:.4g} (0.5 is the default)"
        )
    for i, lam in enumerate(lambdas):
        if lam > big:
            raise ConfigError(
                f"source_weights[{i}]: {lam} exceeds the largest {_dtype_name(space.dtype)} "
                f"number; rescale the source weights (only their ratios and the learning rate "
                f"matter)"
            )
    check_evidence_range(space, config.clip, config.prior_weight, S)


def check_options(xp: Any, dtype: Any, lambdas: Sequence[float], config: CalibrationConfig) -> None:
    """Refuse the options that can only give non-finite results for statistics of ``xp`` in
    ``dtype`` (:func:`check_ranges` in the dtype the calibration works in; half precision
    works in float32). ``lambdas``: the resolved source weights, one per source (S,). Needs
    no array values, so an integration can call it on static dtypes (under ``jax.jit``)."""
    check_ranges(_work_space(Space(xp, dtype, None)), len(lambdas), lambdas, config)


def resolved_config(config: CalibrationConfig | None) -> CalibrationConfig:
    config = CalibrationConfig() if config is None else config
    if not isinstance(config, CalibrationConfig):
        raise ConfigError(f"config: expected CalibrationConfig, got {type(config).__name__}")
    return config
