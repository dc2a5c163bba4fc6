"""Several parameter tensors at once, grouped by ``config.scope``
(docs/method.md#calibrated-update)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ._calibration import calibrate
from ._inputs import resolved_config
from ._namespace import check_same_shape, resolve
from ._statistics import GradientStats
from ._types import Calibration, CalibrationConfig
from .errors import ConfigError, ShapeError

__all__ = ["calibrate_tensors"]


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
    ``source_weights`` maps every source name to its fixed weight. Returns one
    :class:`Calibration` per tensor, in order. ``check_values`` as in
    :func:`calibrate`.
    """
    config = resolved_config(config)
    if isinstance(stats_per_tensor, Mapping) or not isinstance(stats_per_tensor, Sequence):
        raise ShapeError(
            f"stats_per_tensor: expected a sequence (one mapping name -> GradientStats per "
            f"tensor), got {type(stats_per_tensor).__name__}"
        )
    if source_weights is not None and not isinstance(source_weights, Mapping):
        raise ConfigError(
            f"source_weights: must be None or a mapping name -> number, got "
            f"{type(source_weights).__name__}"
        )
    for i, srcs in enumerate(stats_per_tensor):
        if not isinstance(srcs, Mapping) or not srcs:
            raise ShapeError(
                f"stats_per_tensor[{i}]: expected a non-empty mapping name -> GradientStats "
                f"(the sources that reach tensor {i}), got {srcs!r:.60}"
            )
        if source_weights is not None:
            missing = [str(k) for k in srcs if k not in source_weights]
            if missing:
                raise ShapeError(
                    f"source_weights: no weight for the sources {missing} of "
                    f"stats_per_tensor[{i}]; give every source a weight, or pass None"
                )

    def lam_for(srcs: Mapping[str, GradientStats]) -> dict[str, float] | None:
        return None if source_weights is None else {k: source_weights[k] for k in srcs}

    if config.scope == "tensor":
        return [
            calibrate(srcs, config, lam_for(srcs), check_values=check_values)
            for srcs in stats_per_tensor
        ]

    # Every tensor of the call shares one namespace, device and dtype, as in
    # calibrate(); checked before any array is concatenated.
    means, labels = [], []
    for i, srcs in enumerate(stats_per_tensor):
        for k, st in srcs.items():
            if not isinstance(st, GradientStats):
                raise ShapeError(
                    f"stats_per_tensor[{i}][{k!r}]: expected GradientStats, got {type(st).__name__}"
                )
            means.append(st.mean)
            labels.append(f"stats_per_tensor[{i}][{k!r}]")
    resolve(*means, names=tuple(labels))

    out: list[Calibration | None] = [None] * len(stats_per_tensor)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, srcs in enumerate(stats_per_tensor):
        groups.setdefault(tuple(srcs), []).append(i)
    for key, idx in groups.items():
        first = stats_per_tensor[idx[0]][key[0]]
        xp = first.space.xp
        sizes = [math.prod(stats_per_tensor[i][key[0]].shape) for i in idx]
        for i in idx:
            for k in key:
                check_same_shape(
                    stats_per_tensor[i][k].shape,
                    stats_per_tensor[i][key[0]].shape,
                    f"stats_per_tensor[{i}][{k!r}]",
                )

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
