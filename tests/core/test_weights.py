"""Stage 5a (bogc_core._weights): fused weights, Dempster attribution by quadrature."""

from __future__ import annotations

import numpy as np
import pytest

import bogc_core as bc
from bogc_core import fused_weights
from bogc_core.testing import oracle


def stats_np(ns, samples):
    return bc.GradientStats.from_samples(ns.asarray(samples))


# 9 --------------------------------------------------------------------------
def test_two_source_dempster_attribution(ns, rng):
    samples = [rng.normal(loc, sd, size=(9, 12)) for loc, sd in [(0.4, 1), (0.1, 0.5)]]
    cal = bc.calibrate([stats_np(ns, s) for s in samples], bc.CalibrationConfig(weights="dempster"))
    e = ns.to_numpy(cal.evidence)
    b, u = e / (e + 1), 1 / (e + 1)
    w1 = (b[0] * u[1] + b[0] * b[1] / 2) / (1 - u[0] * u[1])
    ns.close(cal.weights[0, ...], w1)
    ns.close(cal.weights[1, ...], 1 - w1)


@pytest.mark.parametrize("S", [1, 2, 3, 4, 5, 6])
def test_dempster_shares_match_subset_enumeration(ns, rng, S):
    e = rng.lognormal(0, 1.5, size=(S, 7))
    b, u = e / (e + 1), 1 / (e + 1)
    B = 1 - np.prod(u, axis=0)
    xe = ns.asarray(e)
    w = fused_weights("dempster", xe, ns.asarray(b), ns.asarray(u), ns.asarray(B))
    ns.close(w, oracle.dempster_shares_bruteforce(b), scale=10)


def test_equal_statistics_respect_fused_weights(ns):
    m = np.linspace(-1, 1, 6)
    stats = [bc.GradientStats(5.0, ns.asarray(m), ns.asarray(np.ones(6))) for _ in range(2)]
    # equal statistics per source but not across dimensions: weights stay 1/2
    cal = bc.calibrate(stats, bc.CalibrationConfig(scale="none"), source_weights=[2.0, 0.5])
    ns.close(cal.gradient, 2.5 * m)
