"""Stage 2 (bogc_core._evidence): log scores, the shared reference, the power map."""

from __future__ import annotations

import numpy as np
import pytest

import bogc_core as bc
from bogc_core.errors import (
    ConfigError,
    ShapeError,
)


def stats_np(ns, samples):
    return bc.GradientStats.from_samples(ns.asarray(samples))


# 10 -------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1e-4, 0.3, 50.0])
def test_snr_invariant_to_one_source_scale(ns, rng, c):
    samples = [rng.normal(loc, sd, size=(8, 10)) for loc, sd in [(0.2, 1), (-0.3, 0.6)]]
    cfg = bc.CalibrationConfig(evidence_from="snr", weights="dempster")
    base = bc.calibrate([stats_np(ns, s) for s in samples], cfg)
    scaled = bc.calibrate([stats_np(ns, c * samples[0]), stats_np(ns, samples[1])], cfg)
    for name in ("evidence", "weights", "uncertainty", "belief_scale"):
        ns.close(getattr(scaled, name), ns.to_numpy(getattr(base, name)), scale=20)
    # only source 0's term changes, by the factor c
    s = ns.to_numpy(base.belief_scale)
    w = ns.to_numpy(base.weights)
    m0 = samples[0].mean(0)
    want = ns.to_numpy(base.gradient) + s * 2 * w[0] * (c - 1) * m0
    ns.close(scaled.gradient, want, scale=50, atol=ns.atol * 50 * max(1.0, c))


def test_zero_mean_dimension_stays_finite(ns, rng):
    x = rng.normal(size=(6, 5))
    x[:, 2] = np.array([1.0, -1.0, 1.0, -1.0, 2.0, -2.0])  # mean exactly 0
    st = bc.GradientStats.from_samples(ns.asarray(x))
    cal = bc.calibrate([st, bc.GradientStats.from_samples(ns.asarray(x[::-1] * 0.5 + 0.1))])
    assert np.all(np.isfinite(ns.to_numpy(cal.gradient)))
    assert np.all(np.isfinite(ns.to_numpy(cal.evidence)))


def test_empty_dimension_does_not_poison_the_group(ns):
    """A dimension with n = 0 (but stray M2) is ignored by the pooled variance."""
    counts = np.array([0.0, 3.0, 4.0])
    st = bc.GradientStats(
        ns.asarray(counts),
        ns.asarray(np.array([0.0, 1.0, -1.0])),
        ns.asarray(np.array([5.0, 2.0, 3.0])),
    )
    ns.close(st.variance, np.array([0.0, 2 / 3, 3 / 4]))
    other = bc.GradientStats.from_samples(ns.asarray(np.arange(12.0).reshape(4, 3) ** 0.5))
    cal = bc.calibrate([st, other])
    assert np.all(np.isfinite(ns.to_numpy(cal.gradient)))


def test_evidence_errors(ns):
    post = bc.posterior(bc.GradientStats.from_samples(ns.asarray(np.arange(6.0).reshape(3, 2))))
    with pytest.raises(ShapeError, match=r"posteriors: empty"):
        bc.evidence([])
    with pytest.raises(ConfigError, match=r"evidence_from"):
        bc.evidence([post], evidence_from="x")
    other = bc.posterior(bc.GradientStats.from_samples(ns.asarray(np.arange(9.0).reshape(3, 3))))
    with pytest.raises(ShapeError, match=r"posteriors\[1\]: shape"):
        bc.evidence([post, other])
