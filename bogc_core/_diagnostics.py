"""Cheap per-group reductions of a :class:`~bogc_core.Calibration` for logs and plots.

Each value is a plain Python float, bool or list, so the dictionary can be
logged or serialised to JSON directly. Computing it synchronises with the
device once per reduction, which is why :attr:`Calibration.diagnostics` is
lazy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._namespace import resolve

if TYPE_CHECKING:
    from ._types import Calibration

__all__ = []


@dataclass
class Reductions:
    """The per-group reductions behind :func:`summarize`, however they were computed.

    Per source (lists of ``S`` floats, in the order of the sources): the means
    over the group's ``num_dims`` dimensions of the evidence ``e``, the belief
    ``b = e/(e+W)``, the uncertainty ``u = W/(e+W)``, the fused weight ``w``,
    and ``top``, the share of dimensions where the source has the largest
    weight (the first one on ties, argmax's rule); scalars: the mean fused
    uncertainty ``U``, the ranges of the belief scale ``s`` and of ``e`` over
    every source, and whether the gradient holds NaN or inf. NaN means for an
    empty group.
    """

    num_dims: int
    evidence: list[float]
    belief: list[float]
    uncertainty: list[float]
    weight: list[float]
    top: list[float]
    fused_uncertainty: float
    belief_scale_min: float
    belief_scale_max: float
    evidence_min: float
    evidence_max: float
    nonfinite: bool


def reductions(cal: Calibration) -> Reductions:
    """The :class:`Reductions` of a full :class:`~bogc_core.Calibration` (one group)."""
    space = resolve(cal.evidence)
    xp = space.xp
    e, w, W = cal.evidence, cal.weights, cal.prior_weight
    S = len(cal.sources)
    b = e / (e + W)
    u = W / (e + W)
    D = math.prod(cal.gradient.shape)
    # Share of first maxima over the sources (argmax's tie rule), written as a
    # column maximum and S comparisons: an argmax over the short leading axis
    # is a strided reduction per column, far slower on PyTorch CPU.
    mx = xp.max(w, axis=0) if D > 0 else w
    taken = None
    top_counts = []
    for k in range(S if D > 0 else 0):
        is_top = w[k, ...] == mx
        if taken is not None:
            is_top = xp.logical_and(is_top, xp.logical_not(taken))
        top_counts.append(int(xp.count_nonzero(is_top)))
        taken = is_top if taken is None else xp.logical_or(taken, is_top)

    def red(fn: Any, x: Any) -> float:
        # an empty parameter has no dimensions to reduce over
        return float(fn(x)) if D > 0 else math.nan

    def per_source(x: Any) -> list[float]:
        return [red(xp.mean, x[k, ...]) for k in range(S)]

    return Reductions(
        num_dims=D,
        evidence=per_source(e),
        belief=per_source(b),
        uncertainty=per_source(u),
        weight=per_source(w),
        top=[top_counts[k] / D if D > 0 else math.nan for k in range(S)],
        fused_uncertainty=red(xp.mean, cal.uncertainty),
        belief_scale_min=red(xp.min, cal.belief_scale),
        belief_scale_max=red(xp.max, cal.belief_scale),
        evidence_min=red(xp.min, e),
        evidence_max=red(xp.max, e),
        nonfinite=not space.all_finite(cal.gradient),
    )


def from_reductions(
    sources: Sequence[str], r: Reductions, flags: Mapping[str, Any]
) -> dict[str, Any]:
    """The dictionary of :func:`summarize` from a group's :class:`Reductions` and flags
    (``zero_variance_sources``, ``path``, ``fallback``, ...)."""

    def per_source(x: Sequence[float]) -> dict[str, float]:
        return {name: float(v) for name, v in zip(sources, x)}

    d: dict[str, Any] = {
        "sources": list(sources),
        "num_dims": int(r.num_dims),
        "evidence_mean": per_source(r.evidence),
        "belief_mean": per_source(r.belief),
        "uncertainty_mean": per_source(r.uncertainty),
        "weight_mean": per_source(r.weight),
        "weight_top_fraction": per_source(r.top),
        "fused_uncertainty_mean": float(r.fused_uncertainty),
        "belief_scale_min": float(r.belief_scale_min),
        "belief_scale_max": float(r.belief_scale_max),
        "evidence_max": float(r.evidence_max),
        "evidence_min": float(r.evidence_min),
    }
    zero_var = list(flags.get("zero_variance_sources", []))
    d["zero_variance"] = bool(zero_var)
    d["num_sources"] = len(sources)
    d["nonfinite"] = bool(r.nonfinite)
    for key, value in flags.items():
        d.setdefault(key, value)
    return d


def summarize(cal: Calibration) -> dict[str, Any]:
    """Diagnostics of docs/method.md#diagnostics for one group.

    Keys: ``sources``; per source (dicts name -> float) ``evidence_mean``,
    ``belief_mean``, ``uncertainty_mean``, ``weight_mean``,
    ``weight_top_fraction`` (share of dimensions where the source has the
    largest weight); scalars ``fused_uncertainty_mean``,
    ``belief_scale_min``/``max``, ``evidence_min``/``max``, ``num_dims``,
    ``num_sources``; ``nonfinite`` (the gradient holds NaN or inf); flags
    ``zero_variance`` (with
    ``zero_variance_sources``), ``path`` and any other flag the producing path
    set (for instance ``fallback``). The fast paths compute the same
    :class:`Reductions` as by-products of their passes
    (``calibrate_gradient(..., summarize=True)``).
    """
    return from_reductions(cal.sources, reductions(cal), cal.flags)
