"""Hypothesis property tests: algebraic laws and robustness, on every namespace."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import bogc_core as bc
from bogc_core.errors import NonFiniteError
from bogc_core.testing import namespace_params

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def sample_sets(draw, max_sources=4):
    """S sources of n samples each over D dimensions (well-conditioned: n >= 2, spread > 0)."""
    S = draw(st.integers(1, max_sources))
    n = draw(st.integers(2, 6))
    D = draw(st.integers(1, 6))
    xs = [draw(arrays(np.float64, (n, D), elements=finite)) for _ in range(S)]
    # a tiny deterministic jitter keeps every source's pooled variance > 0
    jitter = np.linspace(-1, 1, n)[:, None] * 1e-2
    return [x + jitter for x in xs]


@st.composite
def opinions(draw, K, dims=4):
    raw = draw(arrays(np.float64, (dims, K + 1), elements=st.floats(0.05, 1.0)))
    p = raw / raw.sum(axis=1, keepdims=True)
    return p


def to_op(ns, p, K):
    return bc.Opinion(ns.asarray(p[:, :K]), ns.asarray(p[:, K]))


def stats_of(ns, xs):
    return [bc.GradientStats.from_samples(ns.asarray(x)) for x in xs]


@SETTINGS
@given(data=st.data(), K=st.sampled_from([1, 2, 3]))
def test_combine_commutative_associative(ns, data, K):
    pa, pb, pc = (data.draw(opinions(K)) for _ in range(3))
    a, b, c = (to_op(ns, p, K) for p in (pa, pb, pc))
    ab, _ = bc.combine([a, b])
    ba, _ = bc.combine([b, a])
    ns.close(ab.belief, ns.to_numpy(ba.belief), scale=10)
    ns.close(ab.uncertainty, ns.to_numpy(ba.uncertainty), scale=10)
    left, _ = bc.combine([ab, c])
    right, _ = bc.combine([a, bc.combine([b, c])[0]])
    ns.close(left.belief, ns.to_numpy(right.belief), scale=50)
    ns.close(left.uncertainty, ns.to_numpy(right.uncertainty), scale=50)
    # fused masses still sum to 1
    total = ns.to_numpy(left.belief).sum(-1) + ns.to_numpy(left.uncertainty)
    np.testing.assert_allclose(total, 1.0, rtol=50 * ns.rtol)


@SETTINGS
@given(xs=sample_sets(), perm_seed=st.integers(0, 2**16), weights=st.sampled_from(["evidence", "dempster", "uniform"]))
def test_calibrate_permutation_equivariant(ns, xs, perm_seed, weights):
    perm = np.random.default_rng(perm_seed).permutation(len(xs))
    cfg = bc.CalibrationConfig(weights=weights)
    cal = bc.calibrate(stats_of(ns, xs), cfg)
    cal_p = bc.calibrate(stats_of(ns, [xs[i] for i in perm]), cfg)
    ns.close(cal_p.gradient, ns.to_numpy(cal.gradient), scale=100, atol=1e-3 if ns.dtype_name == "float32" else 1e-9)
    ns.close(cal_p.weights, ns.to_numpy(cal.weights)[perm], scale=100)


@SETTINGS
@given(xs=sample_sets(max_sources=3), c=st.floats(1e-3, 1e3), evidence_from=st.sampled_from(["snr", "precision"]))
def test_calibrate_scale_equivariant(ns, xs, c, evidence_from):
    # A mean that is pure rounding noise (samples that cancel) has an snr made of
    # noise, which rescaling changes arbitrarily; the law is about real signal.
    scale = max(float(np.abs(x).max()) for x in xs)
    assume(all(np.all(np.abs(x.mean(0)) > 1e-3 * scale) for x in xs))
    cfg = bc.CalibrationConfig(evidence_from=evidence_from)
    g = ns.to_numpy(bc.calibrate(stats_of(ns, xs), cfg).gradient)
    gc = ns.to_numpy(bc.calibrate(stats_of(ns, [c * x for x in xs]), cfg).gradient)
    tol = 1e-2 if ns.dtype_name == "float32" else 1e-7
    # a mean that is rounding noise (samples cancelling) has no relative accuracy:
    # the absolute tolerance follows the scale of the samples, not of g
    data_scale = max(float(np.abs(x).max()) for x in xs) * len(xs)
    np.testing.assert_allclose(gc, c * g, rtol=tol, atol=tol * c * data_scale)


@SETTINGS
@given(x=arrays(np.float64, st.tuples(st.integers(2, 12), st.integers(1, 5)), elements=finite), cut=st.integers(1, 11))
def test_merge_equals_concatenation(ns, x, cut):
    cut = min(cut, x.shape[0] - 1)
    merged = bc.GradientStats.from_samples(ns.asarray(x[:cut])).merge(bc.GradientStats.from_samples(ns.asarray(x[cut:])))
    whole = bc.GradientStats.from_samples(ns.asarray(x))
    ns.close(merged.count, ns.to_numpy(whole.count))
    spread = float(np.abs(x).max()) + 1.0
    ns.close(merged.mean, ns.to_numpy(whole.mean), atol=ns.rtol * spread * 10)
    ns.close(merged.m2, ns.to_numpy(whole.m2), rtol=ns.rtol * 100, atol=ns.rtol * 100 * spread**2 * x.shape[0])


@SETTINGS
@given(xs=sample_sets(), weights=st.sampled_from(["evidence", "dempster", "uniform"]), scale=st.sampled_from(["belief", "none"]))
def test_weights_sum_to_one_and_scale_has_mean_one(ns, xs, weights, scale):
    cal = bc.calibrate(stats_of(ns, xs), bc.CalibrationConfig(weights=weights, scale=scale))
    w = ns.to_numpy(cal.weights)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=20 * ns.rtol)
    assert np.all(w >= 0)
    np.testing.assert_allclose(ns.to_numpy(cal.belief_scale).mean(), 1.0, rtol=20 * ns.rtol)


@SETTINGS
@given(e=arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)), elements=st.floats(0.0, 1e6)), W=st.floats(0.1, 10.0))
def test_belief_plus_uncertainty_is_one(ns, e, W):
    op = bc.Opinion.from_evidence(ns.asarray(e), prior_weight=W)
    np.testing.assert_allclose(ns.to_numpy(op.belief)[..., 0] + ns.to_numpy(op.uncertainty), 1.0, rtol=10 * ns.rtol)
    fb, fu = bc.fuse_single(ns.asarray(e), W)
    np.testing.assert_allclose(ns.to_numpy(fb) + ns.to_numpy(fu), 1.0, rtol=10 * ns.rtol)


@SETTINGS
@given(
    xs=st.lists(arrays(np.float64, (3, 4), elements=st.floats(-1e6, 1e6, allow_nan=False, width=32)), min_size=1, max_size=4),
    gamma=st.floats(0.0, 4.0),
    evidence_from=st.sampled_from(["snr", "precision"]),
    weights=st.sampled_from(["evidence", "dempster", "uniform"]),
)
def test_no_nan_on_finite_input(ns, xs, gamma, evidence_from, weights):
    """Any finite samples, including constant, zero and duplicate ones, give a finite result."""
    cfg = bc.CalibrationConfig(gamma=gamma, evidence_from=evidence_from, weights=weights)
    cal = bc.calibrate(stats_of(ns, xs), cfg)
    for name in ("gradient", "weights", "uncertainty", "belief_scale", "evidence"):
        assert np.all(np.isfinite(ns.to_numpy(getattr(cal, name)))), name


@SETTINGS
@given(pos=st.tuples(st.integers(0, 2), st.integers(0, 3)), bad=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_non_finite_samples_always_rejected(ns, pos, bad):
    x = np.ones((3, 4))
    x[pos] = bad
    try:
        bc.GradientStats.from_samples(ns.asarray(x))
    except NonFiniteError as err:
        assert "x:" in str(err)
    else:
        raise AssertionError("NaN/inf input was accepted")


# Hypothesis draws new shapes for every example, and eager JAX compiles each
# new shape: minutes per test. JAX runs every closed form and numerics test;
# the property tests run on the other namespaces.
@pytest.fixture(params=[p for p in namespace_params() if p.values[0] != "jax"])
def ns_name(request):
    return request.param
