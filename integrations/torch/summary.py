"""The diagnostics :meth:`GradientCalibrator.backward` returns.

Every step reports counts and flags (no device work). On a *sampled* step
(every ``diagnostics_every`` steps) each calibrated tensor is also summarised
by the :attr:`~bogc_core.Calibration.diagnostics` of its full
:class:`~bogc_core.Calibration` (recomputed from the step's flat statistics;
the training step itself never forms the ``(S, D)`` outputs), and the model
gets numel-weighted means of the per-tensor values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from bogc_core import CalibrationConfig, GradientStats, calibrate_tensors

from .workspace import Group

__all__ = ["SUMMARY_KEYS", "group_entries", "model_summary"]

# The keys of Calibration.diagnostics that diagnostics="summary" keeps per tensor.
SUMMARY_KEYS = ("sources", "weight_mean", "evidence_mean", "fused_uncertainty_mean",
                "belief_scale_min", "belief_scale_max", "path", "fallback")


def group_entries(group: Group, names: list[str], shapes: list[torch.Size], config: CalibrationConfig,
                  lam: Mapping[str, float] | None, level: str) -> dict[str, dict[str, Any]]:
    """Per tensor of a calibrated group: the ``diagnostics`` of its calibration (``level="full"``),
    or the :data:`SUMMARY_KEYS` of it (``level="summary"``); keyed by parameter name."""
    stats = group.stats()
    per_tensor = []
    for j, shape in enumerate(shapes):
        per_tensor.append({
            s: GradientStats(
                st.count if st.count.dim() == 0 else group.piece(st.count, j, shape),
                group.piece(st.mean, j, shape), group.piece(st.m2, j, shape),
            )
            for s, st in stats.items()
        })
    cals = calibrate_tensors(per_tensor, config, None if lam is None else dict(lam), check_values=False)
    out = {}
    for name, cal in zip(names, cals):
        d = dict(cal.diagnostics)
        out[name] = d if level == "full" else {k: d[k] for k in SUMMARY_KEYS if k in d}
    return out


def model_summary(entries: Mapping[str, Mapping[str, Any]], numels: Mapping[str, int],
                  names: list[str]) -> dict[str, Any]:
    """Numel-weighted means over the calibrated tensors of the per-source weight and evidence
    means and of the fused uncertainty, and the belief scale's range."""
    tot = sum(numels[n] for n in entries)
    wm = {s: 0.0 for s in names}
    em = {s: 0.0 for s in names}
    fu, smin, smax = 0.0, math.inf, -math.inf
    for n, e in entries.items():
        frac = numels[n] / tot
        fu += frac * e["fused_uncertainty_mean"]
        smin = min(smin, e["belief_scale_min"])
        smax = max(smax, e["belief_scale_max"])
        for s in e["sources"]:
            wm[s] += frac * e["weight_mean"][s]
            em[s] += frac * e["evidence_mean"][s]
    return {"weight_mean": wm, "evidence_mean": em, "fused_uncertainty_mean": fu,
            "belief_scale_min": smin, "belief_scale_max": smax}
