"""Stage 5: the calibrated update, and the pipeline that leads to it.

For one group of dimensions (a parameter tensor by default)::

    stats -> posterior -> log score l -> evidence e -> opinions (b, u)
          -> fused belief B = 1 - prod_k u_k -> weights w -> belief scale s
    g_hat_d = s_d * S * sum_k w_kd * lambda_k * mu_kd

With equal evidence everywhere ``g_hat = sum_k lambda_k * mu_k``, the gradient
of the plain weighted sum of losses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ._namespace import Space, check_same_shape, resolve
from ._types import SCALES, SCOPES, Calibration, CalibrationConfig
from .errors import ConfigError, ShapeError
from .evidence import evidence_from_log_scores, log_score
from .opinion import fuse_single
from .posterior import Posterior, posterior
from .stats import GradientStats
from .weights import source_weights as _source_weights

__all__ = [
    "CalibrationConfig",
    "Calibration",
    "calibrate",
    "calibrate_tensors",
    "calibrate_gradient",
    "SCALES",
    "SCOPES",
    "prepare_sources",
    "resolve_source_weights",
    "calibrated_update",
]

def resolve_source_weights(
    names: Sequence[str], source_weights: Sequence[float] | Mapping[str, float] | None
) -> list[float]:
    """The fixed ``lambda_k`` as a list of floats in the order of ``names`` (default 1)."""
    if source_weights is None:
        lambdas = [1.0] * len(names)
    elif isinstance(source_weights, Mapping):
        missing = [n for n in names if n not in source_weights]
        extra = [str(k) for k in source_weights if str(k) not in names]
        if missing or extra:
            raise ShapeError(
                f"source_weights: keys must match the sources {names}; missing {missing}, "
                f"unknown {extra}"
            )
        lambdas = [float(source_weights[n]) for n in names]
    else:
        lambdas = [float(v) for v in source_weights]
        if len(lambdas) != len(names):
            raise ShapeError(
                f"source_weights: {len(lambdas)} values for {len(names)} sources; give one "
                f"weight per source"
            )
    if not all(math.isfinite(v) for v in lambdas):
        raise ConfigError(f"source_weights: must be finite numbers, got {lambdas}")
    return lambdas


def prepare_sources(
    stats_per_source: Sequence[GradientStats] | Mapping[str, GradientStats],
    source_weights: Sequence[float] | Mapping[str, float] | None = None,
    check_values: bool = True,
) -> tuple[list[str], list[GradientStats], list[float], Space]:
    """Normalise the inputs of :func:`calibrate`; validate shapes, namespaces and
    (with ``check_values``) values."""
    if isinstance(stats_per_source, GradientStats):
        raise ShapeError(
            "stats_per_source: got a single GradientStats; pass a sequence or a mapping "
            "name -> GradientStats, one per source"
        )
    if isinstance(stats_per_source, Mapping):
        names = [str(k) for k in stats_per_source]
        stats = list(stats_per_source.values())
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
        if check_values:
            s.check(f"stats_per_source[{name!r}]")

    lambdas = resolve_source_weights(names, source_weights)
    return names, stats, lambdas, space


def calibrate(
    stats_per_source: Sequence[GradientStats] | Mapping[str, GradientStats],
    config: CalibrationConfig | None = None,
    source_weights: Sequence[float] | Mapping[str, float] | None = None,
    *,
    check_values: bool = True,
) -> Calibration:
    """Calibrated update of one group from each source's gradient statistics.

    ``stats_per_source``: a sequence of ``GradientStats`` (one per source) or
    a mapping name -> ``GradientStats``, all of shape ``(*shape)`` in one
    namespace, device and dtype. ``source_weights``: fixed ``lambda_k``
    applied after calibration (default 1). The whole input is one group: the
    empirical-Bayes prior, the evidence reference and the belief-scale mean
    are taken over all its dimensions (see :func:`calibrate_tensors` for
    several tensors). Returns a :class:`Calibration` in the input's namespace.

    ``check_values=False`` skips the scan of every statistic for NaN, inf and
    negative values (shapes, namespaces and options are still checked): for
    callers that built the statistics themselves and have checked their
    inputs, such as the training integrations, where the scan would cost
    several passes over the data per step.
    """
    config = CalibrationConfig() if config is None else config
    if not isinstance(config, CalibrationConfig):
        raise ConfigError(f"config: expected CalibrationConfig, got {type(config).__name__}")
    names, stats, lambdas, space = prepare_sources(stats_per_source, source_weights, check_values)
    if config.backend != "reference":
        from .dispatch import run_fast_path

        result = run_fast_path(space, names, stats, lambdas, config)
        if result is not None:
            return result
    return reference_calibrate(names, stats, lambdas, space, config)


def reference_calibrate(
    names: Sequence[str],
    stats: Sequence[GradientStats],
    lambdas: Sequence[float],
    space: Space,
    config: CalibrationConfig,
    flags: Mapping[str, Any] | None = None,
) -> Calibration:
    """The Array API reference pipeline on already validated inputs."""
    xp = space.xp
    posts = [posterior(s, config.prior) for s in stats]
    # A source whose pooled variance is exactly 0 (deterministic gradients)
    # has infinite precision everywhere: no dimension is more reliable than
    # another, so the whole group falls back to equal evidence.
    zero_var = [
        n for n, s in zip(names, stats) if config.prior.beta0 is None and not bool(xp.any(s.m2 > 0))
    ]
    g, w, fused_u, s, e = calibrated_update(posts, lambdas, config, bool(zero_var))
    all_flags = {"path": "reference", "zero_variance_sources": zero_var}
    all_flags.update(flags or {})
    return Calibration(g, w, fused_u, s, e, names, config.prior_weight, all_flags)


def calibrated_update(
    posts: Sequence[Posterior],
    lambdas: Sequence[float],
    config: CalibrationConfig,
    equal_evidence: Any = False,
) -> tuple[Any, Any, Any, Any, Any]:
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
    if equal_evidence is True:
        e = xp.ones_like(mu)
    else:
        l = xp.stack([log_score(p, config.evidence_from) for p in posts], axis=0)
        e = evidence_from_log_scores(l, config.gamma, config.clip)
        if equal_evidence is not False:
            e = xp.where(equal_evidence, xp.ones_like(e), e)
    W = config.prior_weight
    fused_b, fused_u = fuse_single(e, W)
    if config.weights == "dempster":
        b = e / (e + W)
        w = _source_weights("dempster", e, b, W / (e + W), fused_b)
    else:
        w = _source_weights(config.weights, e)
    if config.scale == "belief":
        s = fused_b / xp.mean(fused_b)
        if config.s_max is not None:
            s = xp.clip(s, max=float(config.s_max))
    else:
        s = xp.ones_like(fused_b)
    lam = xp.reshape(space.asarray(list(lambdas)), (S,) + (1,) * len(shape))
    g = s * (S * xp.sum(w * lam * mu, axis=0))
    return g, w, fused_u, s, e


def _flatten(st: GradientStats) -> GradientStats:
    """``st`` as one-dimensional statistics (count broadcast to every dimension)."""
    xp = st.space.xp
    n = xp.reshape(xp.broadcast_to(st.count, st.shape), (-1,))
    return GradientStats(n, xp.reshape(st.mean, (-1,)), xp.reshape(st.m2, (-1,)))


def calibrate_tensors(
    stats_per_tensor: Sequence[Mapping[str, GradientStats]],
    config: CalibrationConfig | None = None,
    source_weights: Mapping[str, float] | None = None,
    *,
    check_values: bool = True,
) -> list[Calibration]:
    """Calibrate several parameter tensors, grouped by ``config.scope``.

    ``stats_per_tensor[i]`` maps the names of the sources that reach tensor
    ``i`` to their statistics. ``scope="tensor"`` calibrates each tensor on
    its own; ``scope="global"`` pools every tensor reached by the same set of
    sources into one group (flattened and concatenated), so the prior, the
    evidence reference and the belief-scale mean are shared across them.
    Returns one :class:`Calibration` per tensor, in order. ``check_values``
    as in :func:`calibrate`.
    """
    config = CalibrationConfig() if config is None else config

    def lam_for(srcs: Mapping[str, GradientStats]) -> dict[str, float] | None:
        return None if source_weights is None else {k: source_weights[k] for k in srcs}

    if config.scope == "tensor":
        return [
            calibrate(srcs, config, lam_for(srcs), check_values=check_values)
            for srcs in stats_per_tensor
        ]

    out: list[Calibration | None] = [None] * len(stats_per_tensor)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, srcs in enumerate(stats_per_tensor):
        groups.setdefault(tuple(srcs), []).append(i)
    for key, idx in groups.items():
        first = stats_per_tensor[idx[0]][key[0]]
        xp = first.space.xp
        sizes = [math.prod(stats_per_tensor[i][key[0]].shape) for i in idx]

        pooled = {}
        for k in key:
            parts = [_flatten(stats_per_tensor[i][k]) for i in idx]
            pooled[k] = GradientStats(
                xp.concat([p.count for p in parts]),
                xp.concat([p.mean for p in parts]),
                xp.concat([p.m2 for p in parts]),
            )
        cal = calibrate(pooled, config, lam_for(pooled), check_values=check_values)
        start = 0
        for i, size in zip(idx, sizes):
            shape = stats_per_tensor[i][key[0]].shape
            sl = slice(start, start + size)
            out[i] = Calibration(
                xp.reshape(cal.gradient[sl], shape),
                xp.reshape(cal.weights[:, sl], (len(key),) + shape),
                xp.reshape(cal.uncertainty[sl], shape),
                xp.reshape(cal.belief_scale[sl], shape),
                xp.reshape(cal.evidence[:, sl], (len(key),) + shape),
                cal.sources,
                cal.prior_weight,
                {**cal.flags, "group_size": len(idx)},
            )
            start += size
    return [c for c in out if c is not None]


def calibrate_gradient(
    stats_per_source: Sequence[GradientStats] | Mapping[str, GradientStats],
    config: CalibrationConfig | None = None,
    *,
    source_weights: Sequence[float] | Mapping[str, float] | None = None,
    out: Any = None,
    segments: Sequence[int] | None = None,
    diagnostics: dict[str, Any] | None = None,
    check_values: bool = True,
) -> Any:
    """The calibrated gradient alone: ``calibrate(...).gradient`` without the other outputs.

    ``stats_per_source`` and ``source_weights`` as in :func:`calibrate`.

    ``segments``: ``None`` (the whole input is one group), or positive segment
    lengths ``(n_1, ..., n_G)`` with ``sum = D`` over one-dimensional
    statistics of shape ``(D,)``: each segment is its own group (its own
    empirical-Bayes prior, evidence reference and belief-scale mean), so the
    result equals calibrating each segment on its own and concatenating. This
    is how a whole model is calibrated in one call with ``scope="tensor"``.

    ``out``: an array of the result's shape, namespace, dtype and device that
    receives the gradient (returned); ``None`` allocates.

    ``diagnostics``: ``None`` (no diagnostics, no extra pass), or a dict that
    is filled with scalar diagnostics (``path``, ``fallback`` when a fast path
    declined, ``zero_variance_sources``).
    """
    config = CalibrationConfig() if config is None else config
    if not isinstance(config, CalibrationConfig):
        raise ConfigError(f"config: expected CalibrationConfig, got {type(config).__name__}")
    names, stats, lambdas, space = prepare_sources(stats_per_source, source_weights, check_values)
    xp = space.xp
    shape = stats[0].shape
    if segments is None:
        bounds: list[tuple[int, int | None]] = [(0, None)]
    else:
        if len(shape) != 1:
            raise ShapeError(
                f"segments: given, so the statistics must be one-dimensional (D,); got shape "
                f"{shape}; flatten them, or pass segments=None"
            )
        lengths = [int(n) for n in segments]
        if any(n < 1 for n in lengths) or sum(lengths) != shape[0]:
            raise ShapeError(
                f"segments: must be positive lengths summing to D={shape[0]}; got {lengths}"
            )
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        bounds = [(a, a + n) for a, n in zip(starts, lengths)]
    parts = []
    zero_var: list[str] = []
    paths: list[str] = []
    fallbacks: list[str] = []
    for a, b in bounds:
        if b is None:
            seg = dict(zip(names, stats))
        else:
            seg = {
                k: GradientStats(
                    st.count if len(tuple(getattr(st.count, "shape", ()))) == 0 else st.count[a:b],
                    st.mean[a:b],
                    st.m2[a:b],
                )
                for k, st in zip(names, stats)
            }
        cal = calibrate(seg, config, dict(zip(names, lambdas)), check_values=False)
        parts.append(cal.gradient)
        if diagnostics is not None:
            zero_var.extend(cal.flags.get("zero_variance_sources", []))
            paths.append(str(cal.flags.get("path", "reference")))
            if "fallback" in cal.flags:
                fallbacks.append(str(cal.flags["fallback"]))
    g = parts[0] if len(parts) == 1 else xp.concat(parts)
    if diagnostics is not None:
        diagnostics["path"] = paths[0]
        diagnostics["zero_variance_sources"] = sorted(set(zero_var))
        if fallbacks:
            diagnostics["fallback"] = fallbacks[0]
    if out is None:
        return g
    check_same_shape(tuple(out.shape), tuple(g.shape), "out")
    out[...] = g
    return out
