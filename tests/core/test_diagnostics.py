"""bogc_core._diagnostics: Calibration.diagnostics."""

from __future__ import annotations

import numpy as np

import bogc_core as bc


def test_diagnostics_are_plain_python(ns, rng):
    stats = {k: bc.GradientStats.from_samples(ns.asarray(rng.normal(size=(5, 3)))) for k in "ab"}
    d = bc.calibrate(stats).diagnostics
    assert d["sources"] == ["a", "b"]
    for key in (
        "evidence_mean",
        "belief_mean",
        "uncertainty_mean",
        "weight_mean",
        "weight_top_fraction",
    ):
        assert set(d[key]) == {"a", "b"}
        assert all(type(v) is float for v in d[key].values())
    assert abs(sum(d["weight_mean"].values()) - 1) < 1e-5
    assert abs(sum(d["weight_top_fraction"].values()) - 1) < 1e-6
    for k in ("a", "b"):
        assert abs(d["belief_mean"][k] + d["uncertainty_mean"][k] - 1) < 1e-5
    assert type(d["fused_uncertainty_mean"]) is float
    assert d["belief_scale_min"] <= 1.0 <= d["belief_scale_max"]
    assert d["path"] in ("reference",) or isinstance(d["path"], str)


def test_top_weight_fraction_counts_ties_for_the_first_source(ns, rng):
    m = np.linspace(-1, 1, 6)
    equal = [bc.GradientStats(5.0, ns.asarray(m), ns.asarray(np.ones(6))) for _ in range(3)]
    d = bc.calibrate(equal).diagnostics
    assert d["weight_top_fraction"] == {"0": 1.0, "1": 0.0, "2": 0.0}  # argmax's tie rule
    x = [rng.normal(0.3, sd, size=(8, 50)) for sd in (0.5, 1.0, 2.0)]
    cal = bc.calibrate([bc.GradientStats.from_samples(ns.asarray(v)) for v in x])
    top = np.argmax(ns.to_numpy(cal.weights), axis=0)
    want = {str(k): float(np.mean(top == k)) for k in range(3)}
    assert cal.diagnostics["weight_top_fraction"] == want
