"""The diagnostics :meth:`GradientCalibrator.backward` returns.

Every step reports counts and flags (no device work). On a *sampled* step
(every ``Diagnostics(every=)`` steps) each calibrated tensor is also summarised
by the keys of :attr:`~bogc_core.Calibration.diagnostics`, which the group's
one ``calibrate_gradient(..., summarize=...)`` call accumulates in the passes
that write the gradient (the step never forms the ``(S, D)`` outputs, and no
second calibration runs), and the model gets each source's means over the
dimensions it reaches (:func:`model_summary`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from bogc_core import CalibrationConfig

from .workspace import Group

__all__ = ["SUMMARY_KEYS", "group_entries", "model_summary"]

# The keys of Calibration.diagnostics that diagnostics="summary" keeps per tensor.
SUMMARY_KEYS = ("sources", "weight_mean", "evidence_mean", "fused_uncertainty_mean",
                "belief_scale_min", "belief_scale_max", "path", "fallback")


def group_entries(group: Group, names: list[str], config: CalibrationConfig,
                  level: str) -> dict[str, dict[str, Any]]:
    """Per tensor of a calibrated group: the ``diagnostics`` of its calibration (``level="full"``),
    or the :data:`SUMMARY_KEYS` of it (``level="summary"``); keyed by parameter name.

    The values are those :meth:`Group.calibrate` left in ``group.summaries`` (the same as
    ``calibrate_tensors`` of the group's statistics would give, without calibrating again)."""
    if len(group.summaries) != len(names):
        raise RuntimeError("group_entries: the group was not calibrated with a diagnostics dict")
    out = {}
    for name, d in zip(names, group.summaries):
        if config.scope == "global":  # as calibrate_tensors reports a pooled group
            d = {**d, "group_size": len(names)}
        out[name] = d if level == "full" else {k: d[k] for k in SUMMARY_KEYS if k in d}
    return out


def model_summary(entries: Mapping[str, Mapping[str, Any]], numels: Mapping[str, int],
                  names: list[str]) -> dict[str, Any]:
    """Model-level means of the calibrated tensors' summaries.

    ``weight_mean[s]`` and ``evidence_mean[s]``: source ``s``'s mean over the
    dimensions it reaches, ``sum_n D_n v_{n,s} / sum_n D_n`` over the
    calibrated tensors ``n`` that ``s`` reaches (``D_n`` their sizes); a
    source that reaches no calibrated tensor is left out. The fused
    uncertainty is the size-weighted mean over all calibrated tensors, and
    the belief scale's range is taken over them.
    """
    tot = sum(numels[n] for n in entries)
    wm = {s: 0.0 for s in names}
    em = {s: 0.0 for s in names}
    reach = {s: 0 for s in names}
    fu, smin, smax = 0.0, math.inf, -math.inf
    for n, e in entries.items():
        fu += numels[n] / tot * e["fused_uncertainty_mean"]
        smin = min(smin, e["belief_scale_min"])
        smax = max(smax, e["belief_scale_max"])
        for s in e["sources"]:
            wm[s] += numels[n] * e["weight_mean"][s]
            em[s] += numels[n] * e["evidence_mean"][s]
            reach[s] += numels[n]
    mine = [s for s in names if reach[s] > 0]
    return {"weight_mean": {s: wm[s] / reach[s] for s in mine},
            "evidence_mean": {s: em[s] / reach[s] for s in mine},
            "dimensions": {s: reach[s] for s in mine},
            "fused_uncertainty_mean": fu, "belief_scale_min": smin, "belief_scale_max": smax}
