"""Cheap per-group reductions of a :class:`~bogc_core.Calibration` for logs and plots.

Each value is a plain Python float, bool or list, so the dictionary can be
logged or serialised to JSON directly. Computing it synchronises with the
device once per reduction, which is why :attr:`Calibration.diagnostics` is
lazy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._namespace import resolve

if TYPE_CHECKING:
    from ._types import Calibration

__all__ = []


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
    set (for instance ``fallback``).
    """
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

    def per_source(x: Any) -> dict[str, float]:
        return {name: red(xp.mean, x[k, ...]) for k, name in enumerate(cal.sources)}

    d: dict[str, Any] = {
        "sources": list(cal.sources),
        "num_dims": D,
        "evidence_mean": per_source(e),
        "belief_mean": per_source(b),
        "uncertainty_mean": per_source(u),
        "weight_mean": per_source(w),
        "weight_top_fraction": {
            name: top_counts[k] / D if D > 0 else math.nan for k, name in enumerate(cal.sources)
        },
        "fused_uncertainty_mean": red(xp.mean, cal.uncertainty),
        "belief_scale_min": red(xp.min, cal.belief_scale),
        "belief_scale_max": red(xp.max, cal.belief_scale),
        "evidence_max": red(xp.max, e),
        "evidence_min": red(xp.min, e),
    }
    zero_var = list(cal.flags.get("zero_variance_sources", []))
    d["zero_variance"] = bool(zero_var)
    d["num_sources"] = S
    d["nonfinite"] = not space.all_finite(cal.gradient)
    for key, value in cal.flags.items():
        d.setdefault(key, value)
    return d
