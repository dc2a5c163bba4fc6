"""Stage 5: the calibrated update, and the pipeline that leads to it
(docs/method.md#calibrated-update).

For one group of dimensions (a parameter tensor by default)::

    stats -> posterior -> log score l -> evidence e -> opinions (b, u)
          -> fused belief B = 1 - prod_k u_k -> fused weights w -> belief scale s
    g_hat_d = s_d * S * sum_k w_kd * lambda_k * mu_kd

``lambda_k`` are the *fixed source weights* (the ``source_weights=``
argument), ``w`` the *fused weights* (:func:`~bogc_core.fused_weights`). With
equal evidence everywhere ``g_hat = sum_k lambda_k * mu_k``, the gradient of
the plain weighted sum of losses.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import array_api_compat

from . import _dispatch
from ._evidence import evidence_from_log_scores, log_score
from ._fusion import fuse_beliefs
from ._inputs import (
    SourceWeights,
    StatsPerSource,
    _prepare,
    check_ranges,
    resolved_config,
)
from ._namespace import Space, check_same_shape, resolve
from ._posterior import Posterior, posterior
from ._statistics import GradientStats
from ._types import Array, Calibration, CalibrationConfig, Decline
from ._weights import fused_weights
from .errors import ConfigError, DTypeError, NamespaceError, NonFiniteError, ShapeError

__all__ = ["calibrate", "calibrate_gradient"]


def _finished(space: Space, g: Array, check_values: bool) -> None:
    if check_values and not space.all_finite(g):
        raise NonFiniteError(
            "stats_per_source: the calibrated gradient overflows the dtype (its magnitude "
            "exceeds the largest number); rescale the loss or the source_weights, or use "
            "float64"
        )


def _empty(names: Sequence[str], shape: tuple[int, ...], space: Space,
           config: CalibrationConfig, flags: Mapping[str, Any]) -> Calibration:
    """The calibration of statistics with no elements: empty arrays of the output shapes
    (the fast paths decline such an input, visibly, and the reference has nothing to do)."""
    S = len(names)
    e = space.full((S,) + shape, 1.0)
    g = space.full(shape, 0.0)
    all_flags: dict[str, Any] = {"path": "reference", "zero_variance_sources": []}
    all_flags.update(flags)
    return Calibration(g, e, g, g, e, list(names), config.prior_weight, all_flags)


def _cast_calibration(cal: Calibration, dtype: Any) -> Calibration:
    xp = resolve(cal.gradient).xp
    return Calibration(
        xp.astype(cal.gradient, dtype),
        xp.astype(cal.weights, dtype),
        xp.astype(cal.uncertainty, dtype),
        xp.astype(cal.belief_scale, dtype),
        xp.astype(cal.evidence, dtype),
        cal.sources,
        cal.prior_weight,
        cal.flags,
    )


def calibrate(
    stats_per_source: StatsPerSource,
    config: CalibrationConfig | None = None,
    source_weights: SourceWeights | None = None,
    *,
    check_values: bool = True,
) -> Calibration:
    """Calibrated update of one group from each source's gradient statistics.

    ``stats_per_source``: a sequence of ``GradientStats`` (one per source) or
    a mapping name -> ``GradientStats``, all of shape ``(*shape)`` in one
    namespace, device and dtype. ``source_weights``: the fixed source weights
    ``lambda_k >= 0`` applied after calibration (default 1). The whole input
    is one group: the empirical-Bayes prior, the evidence reference and the
    belief-scale mean are taken over all its dimensions (see
    :func:`calibrate_tensors` for several tensors). Returns a
    :class:`Calibration` in the input's namespace and dtype (float16 and
    bfloat16 are computed in float32). Statistics with no elements (``D = 0``)
    give a :class:`Calibration` of empty arrays: there is nothing to
    calibrate, so no empirical-Bayes prior is needed either.

    ``check_values=False`` skips the scans of every statistic for NaN, inf and
    negative values and of the result for overflow (shapes, namespaces and
    options are still checked): for callers that built the statistics
    themselves, such as the training integrations, where the scans would cost
    several passes over the data per step.
    """
    config = resolved_config(config)
    names, stats, lambdas, space, in_dtype = _prepare(
        stats_per_source, source_weights, check_values
    )
    check_ranges(space, len(stats), lambdas, config)
    flags: dict[str, Any] = {}
    cal: Calibration | None = None
    fp = _dispatch.choose(space, stats[0].mean, config)
    if fp is not None:
        try:
            cal = fp.calibrate(space, names, stats, lambdas, config)
        except Decline as d:
            flags["fallback"] = f"{fp.name}: {d.reason}"
    if cal is None and math.prod(stats[0].shape) == 0:
        cal = _empty(names, stats[0].shape, space, config, flags)
    if cal is None:
        cal = reference_calibrate(names, stats, lambdas, space, config, flags)
    _finished(space, cal.gradient, check_values)
    return cal if in_dtype == space.dtype else _cast_calibration(cal, in_dtype)


def _zero_variance(
    names: Sequence[str], stats: Sequence[GradientStats], space: Space, config: CalibrationConfig
) -> list[str]:
    # A source whose pooled variance is exactly 0 (deterministic gradients)
    # has infinite precision everywhere: no dimension is more reliable than
    # another, so the whole group falls back to equal evidence.
    if config.prior.beta0 is not None:
        return []
    xp = space.xp
    return [n for n, s in zip(names, stats) if not bool(xp.any(s.m2 > 0))]


def reference_calibrate(
    names: Sequence[str],
    stats: Sequence[GradientStats],
    lambdas: Sequence[float],
    space: Space,
    config: CalibrationConfig,
    flags: Mapping[str, Any] | None = None,
) -> Calibration:
    """The Array API reference pipeline on already validated inputs."""
    posts = [posterior(s, config.prior) for s in stats]
    zero_var = _zero_variance(names, stats, space, config)
    g, w, fused_u, s, e = calibrated_update(posts, lambdas, config, bool(zero_var))
    all_flags: dict[str, Any] = {"path": "reference", "zero_variance_sources": zero_var}
    all_flags.update(flags or {})
    return Calibration(g, w, fused_u, s, e, names, config.prior_weight, all_flags)


def _evidence(posts: Sequence[Posterior], config: CalibrationConfig, equal_evidence: Any) -> Array:
    xp = resolve(posts[0].mu).xp
    shape = tuple(posts[0].mu.shape)
    if equal_evidence is True:
        return xp.ones(
            (len(posts),) + shape, dtype=posts[0].mu.dtype, device=resolve(posts[0].mu).device
        )
    l = xp.stack([log_score(p, config.evidence_from) for p in posts], axis=0)
    e = evidence_from_log_scores(l, config.gamma, config.clip)
    if equal_evidence is not False:
        e = xp.where(equal_evidence, xp.ones_like(e), e)
    return e


def _belief_scale(fused_b: Array, config: CalibrationConfig) -> Array:
    xp = resolve(fused_b).xp
    mean_b = xp.mean(fused_b)
    s = fused_b / mean_b
    if config.s_max is not None:
        s = xp.clip(s, max=float(config.s_max))
    return s


def calibrated_update(
    posts: Sequence[Posterior],
    lambdas: Sequence[float],
    config: CalibrationConfig,
    equal_evidence: Any = False,
) -> tuple[Array, Array, Array, Array, Array]:
    """Stages 2-5 from the sources' posteriors: ``(g_hat, w, U, s, e)``.

    Shapes: each posterior's ``mu`` is ``(*shape)``; ``w`` and ``e`` are
    ``(S, *shape)``, the others ``(*shape)``. ``equal_evidence`` (a Python
    bool, or a 0-d boolean array so that a traced caller such as ``jax.jit``
    need not branch on values) replaces the evidence by ones.
    """
    space = resolve(posts[0].mu)
    xp = space.xp
    S = len(posts)
    shape = tuple(posts[0].mu.shape)
    mu = xp.stack([xp.broadcast_to(p.mu, shape) for p in posts], axis=0)
    e = _evidence(posts, config, equal_evidence)
    W = config.prior_weight
    fused_b, fused_u = fuse_beliefs(e, W)
    if config.weights == "dempster":
        w = fused_weights("dempster", e, e / (e + W), W / (e + W), fused_b)
    else:
        w = fused_weights(config.weights, e)
    s = _belief_scale(fused_b, config) if config.scale == "belief" else xp.ones_like(fused_b)
    lam = xp.reshape(space.asarray(list(lambdas)), (S,) + (1,) * len(shape))
    g = s * (S * xp.sum(w * lam * mu, axis=0))
    return g, w, fused_u, s, e


def _segment_bounds(
    segments: Sequence[int] | None, shape: tuple[int, ...]
) -> list[tuple[int, int]] | None:
    if segments is None:
        return None
    if len(shape) != 1:
        raise ShapeError(
            f"segments: given, so the statistics must be one-dimensional (D,); got shape "
            f"{shape}; flatten them, or pass segments=None"
        )
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
        raise ShapeError(f"segments: must be a sequence of positive ints, got {segments!r:.60}")
    lengths: list[int] = []
    for n in segments:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise ShapeError(f"segments: must hold ints, got {n!r}")
        lengths.append(int(n))
    if any(n < 1 for n in lengths) or sum(lengths) != shape[0]:
        raise ShapeError(
            f"segments: must be positive lengths summing to D={shape[0]}; got {lengths}"
        )
    bounds, a = [], 0
    for n in lengths:
        bounds.append((a, a + n))
        a += n
    return bounds


def _segment(st: GradientStats, a: int, b: int) -> GradientStats:
    count = st.count if len(tuple(st.count.shape)) == 0 else st.count[a:b]
    return GradientStats(count, st.mean[a:b], st.m2[a:b])


def calibrate_gradient(
    stats_per_source: StatsPerSource,
    config: CalibrationConfig | None = None,
    *,
    source_weights: SourceWeights | None = None,
    out: Array | None = None,
    segments: Sequence[int] | None = None,
    diagnostics: dict[str, Any] | None = None,
    check_values: bool = True,
) -> Array:
    """The calibrated gradient alone: ``calibrate(...).gradient`` without the other outputs.

    ``stats_per_source`` and ``source_weights`` as in :func:`calibrate`.

    ``segments``: ``None`` (the whole input is one group), or positive segment
    lengths ``(n_1, ..., n_G)`` with ``sum = D`` over one-dimensional
    statistics of shape ``(D,)``: each segment is its own group (its own
    empirical-Bayes prior, evidence reference and belief-scale mean), so the
    result equals calibrating each segment on its own and concatenating. This
    is how a whole model is calibrated in one call with ``scope="tensor"``.

    ``out``: a writable array of the result's shape, namespace, dtype and
    device that receives the gradient (returned); ``None`` allocates.

    Statistics with no elements (``D = 0``, a zero-size parameter) give an
    empty result (as :func:`calibrate` does), whatever the prior.

    ``diagnostics``: ``None`` (no diagnostics, no extra pass), or a dict that
    is filled with scalar diagnostics (``path``, ``fallback`` when a fast path
    declined, ``zero_variance_sources``).

    The fast path of the input's array library computes it when it accepts
    the input; otherwise the reference runs, one segment at a time.
    """
    config = resolved_config(config)
    names, stats, lambdas, space, in_dtype = _prepare(
        stats_per_source, source_weights, check_values
    )
    S = len(stats)
    check_ranges(space, S, lambdas, config)
    shape = stats[0].shape
    bounds = _segment_bounds(segments, shape)
    if out is not None:
        if array_api_compat.is_jax_array(out):
            raise ConfigError(
                "out: JAX arrays are immutable and cannot receive the result; pass out=None "
                "and use the returned array"
            )
        out_space = resolve(out, names=("out",))
        if out_space.xp is not space.xp or out_space.device != space.device:
            raise NamespaceError(
                f"out: must be an array of the statistics' library on {space.device}; got "
                f"{type(out).__name__} on {out_space.device}"
            )
        if out.dtype != in_dtype:
            raise DTypeError(f"out: dtype {out.dtype} differs from the statistics' {in_dtype}")
        check_same_shape(tuple(out.shape), shape, "out")
        if not getattr(getattr(out, "flags", None), "writeable", True):
            # A read-only NumPy array (np.broadcast_to, a memory map opened "r", ...):
            # it is the caller's buffer, so it is refused rather than copied.
            raise ConfigError(
                "out: the array is read-only (out.flags.writeable is False); pass a writable "
                "array, or out=None and use the returned array"
            )
    if diagnostics is not None and not isinstance(diagnostics, dict):
        raise ConfigError(f"diagnostics: must be None or a dict, got {type(diagnostics).__name__}")
    info: dict[str, Any] = {}
    g: Array | None = None
    fp = _dispatch.choose(space, stats[0].mean, config)
    direct_out = out is not None and in_dtype == space.dtype
    if fp is not None:
        try:
            if fp.run_gradient is not None:
                g = fp.run_gradient(
                    space, names, stats, lambdas, config,
                    out=out if direct_out else None, segments=segments, diagnostics=info,
                )  # fmt: skip
                info.setdefault("path", fp.name)
            else:
                parts, zero_var = [], []
                for a, b in bounds or [(0, shape[0] if shape else 0)]:
                    seg = stats if bounds is None else [_segment(st, a, b) for st in stats]
                    cal = fp.calibrate(space, names, seg, lambdas, config)
                    parts.append(cal.gradient)
                    zero_var += list(cal.flags.get("zero_variance_sources", []))
                g = parts[0] if len(parts) == 1 else space.xp.concat(parts)
                info.update(path=fp.name, zero_variance_sources=sorted(set(zero_var)))
        except Decline as d:
            info = {"fallback": f"{fp.name}: {d.reason}"}
            g = None
    if g is None and math.prod(shape) == 0:
        g = space.full(shape, 0.0)  # nothing to calibrate (see calibrate)
        info.update(path="reference", zero_variance_sources=[])
    if g is None:
        parts, zero_var = [], []
        for a, b in bounds or [(0, 0)]:
            seg = stats if bounds is None else [_segment(st, a, b) for st in stats]
            cal = reference_calibrate(names, seg, lambdas, space, config)
            parts.append(cal.gradient)
            zero_var += cal.flags["zero_variance_sources"]
        g = parts[0] if len(parts) == 1 else space.xp.concat(parts)
        info.update(path="reference", zero_variance_sources=sorted(set(zero_var)))
    _finished(space, g, check_values)
    if diagnostics is not None:
        diagnostics.update(info)
    if in_dtype != space.dtype:
        g = space.xp.astype(g, in_dtype)
    if out is None:
        return g
    if g is not out:
        out[...] = g
    return out
