"""Numerical care: extreme gradient scales, the sums form, stable merging, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

import bogc_core as bc
from bogc_core.testing import oracle


def test_extreme_scales_float64(ns64, rng):
    """Gradients from 1e-30 to 1e30 in one call: finite, and equal to the oracle."""
    ns = ns64
    base = [rng.normal(loc, 1.0, size=(7, 12)) for loc in (0.5, -0.3, 0.1)]
    scales = [1e30, 1e-30, 1.0]
    samples = [c * s for c, s in zip(scales, base)]
    cal = bc.calibrate([bc.GradientStats.from_samples(ns.asarray(s)) for s in samples])
    g = ns.to_numpy(cal.gradient)
    assert np.all(np.isfinite(g))
    want, *_ = oracle.calibrate([oracle.stats_of(s) for s in samples])
    np.testing.assert_allclose(g, want, rtol=1e-9)
    # the evidence is that of the unscaled problem (snr is scale free per source)
    ref = bc.calibrate([bc.GradientStats.from_samples(ns.asarray(s)) for s in base])
    ns.close(cal.evidence, ns.to_numpy(ref.evidence), rtol=1e-9)


@pytest.mark.parametrize("c", [1e-30, 1e30])
def test_extreme_scale_equivariance_float64(ns64, rng, c):
    ns = ns64
    samples = [rng.normal(loc, sd, size=(5, 8)) for loc, sd in [(1, 1), (-1, 2)]]
    g1 = ns.to_numpy(bc.calibrate([bc.GradientStats.from_samples(ns.asarray(s)) for s in samples]).gradient)
    gc = ns.to_numpy(bc.calibrate([bc.GradientStats.from_samples(ns.asarray(c * s)) for s in samples]).gradient)
    assert np.all(np.isfinite(gc))
    np.testing.assert_allclose(gc, c * g1, rtol=1e-9)


def test_zero_mean_dimension_stays_finite(ns, rng):
    x = rng.normal(size=(6, 5))
    x[:, 2] = np.array([1.0, -1.0, 1.0, -1.0, 2.0, -2.0])  # mean exactly 0
    st = bc.GradientStats.from_samples(ns.asarray(x))
    cal = bc.calibrate([st, bc.GradientStats.from_samples(ns.asarray(x[::-1] * 0.5 + 0.1))])
    assert np.all(np.isfinite(ns.to_numpy(cal.gradient)))
    assert np.all(np.isfinite(ns.to_numpy(cal.evidence)))


def test_sums_form_roundtrip_float64(ns64, rng):
    ns = ns64
    x = rng.normal(3.0, 0.5, size=(11, 6))
    st = bc.GradientStats.from_samples(ns.asarray(x))
    back = bc.GradientStats.from_sums(*st.to_sums())
    n, m, m2 = oracle.stats_of(x)
    ns.close(back.mean, m)
    ns.close(back.m2, m2, rtol=1e-9)
    # the sums of two parts add up to the sums of the whole
    a, b = (bc.GradientStats.from_samples(ns.asarray(p)) for p in (x[:4], x[4:]))
    sa, sb = a.to_sums(), b.to_sums()
    whole = bc.GradientStats.from_sums(*(p + q for p, q in zip(sa, sb)))
    ns.close(whole.mean, m)
    ns.close(whole.m2, m2, rtol=1e-9)


def test_sums_form_float32_error_is_bounded(rng):
    """Without a shift the conversion loses ~eps * n * m^2 absolutely; a shift removes it."""
    import numpy as xp  # the bound is a property of float32 arithmetic, not of a namespace

    eps = float(np.finfo(np.float32).eps)
    for offset in (0.0, 10.0, 1e3):
        x = (offset + rng.normal(0, 1.0, size=(64, 200))).astype(np.float32)
        st = bc.GradientStats.from_samples(xp.asarray(x))
        back = bc.GradientStats.from_sums(*st.to_sums())
        n, m, m2 = oracle.stats_of(x.astype(np.float64))
        err = np.abs(back.m2.astype(np.float64) - m2)
        bound = 8 * eps * (m2 + n * m**2)
        assert np.all(err <= bound), f"offset {offset}: max err/bound {np.max(err / bound)}"
        shift = st.mean
        back_s = bc.GradientStats.from_sums(*st.to_sums(shift=shift), shift=shift)
        np.testing.assert_allclose(back_s.m2, m2, rtol=1e-4)
        np.testing.assert_allclose(back_s.mean, m, rtol=1e-6, atol=1e-6)


def test_merge_stable_with_large_offset_float32(rng):
    """Chan's merge keeps M2 accurate where the naive sums form would lose it all."""
    x = (300.0 + rng.normal(0, 0.01, size=(40, 50))).astype(np.float32)
    acc = bc.GradientStats.from_samples(x[:1])
    for i in range(1, 40):
        acc = acc.merge(bc.GradientStats.from_samples(x[i : i + 1]))
    _, _, m2 = oracle.stats_of(x.astype(np.float64))
    np.testing.assert_allclose(acc.m2, m2, rtol=1e-2)
    naive = (x * x).sum(0) - x.sum(0) ** 2 / 40  # the textbook one-pass formula
    assert np.max(np.abs(naive - m2) / m2) > 1.0


def test_zero_variance_group_gives_plain_sum(ns):
    """Deterministic gradients: equal evidence everywhere, flagged in the diagnostics."""
    m = np.linspace(-1, 1, 8)
    det = bc.GradientStats(4.0, ns.asarray(m), ns.asarray(np.zeros(8)))
    other = bc.GradientStats(4.0, ns.asarray(0.5 * m + 0.1), ns.asarray(np.linspace(1, 2, 8)))
    cal = bc.calibrate({"fusion": det, "audio": other})
    ns.close(cal.gradient, m + 0.5 * m + 0.1)
    assert cal.diagnostics["zero_variance"] is True
    assert cal.diagnostics["zero_variance_sources"] == ["fusion"]


def test_single_sample_dimensions_excluded_from_pooled_variance(ns):
    counts = np.array([1.0, 4.0, 4.0])
    m2 = np.array([0.0, 2.0, 6.0])
    st = bc.GradientStats(ns.asarray(counts), ns.asarray(np.ones(3)), ns.asarray(m2))
    post = bc.posterior(st)
    # vbar = mean(2/4, 6/4) over the dimensions with n >= 2 only
    ns.close(post.beta, 1.0 + m2 / 2)


def test_diagnostics_are_plain_python(ns, rng):
    stats = {k: bc.GradientStats.from_samples(ns.asarray(rng.normal(size=(5, 3)))) for k in "ab"}
    d = bc.calibrate(stats).diagnostics
    assert d["sources"] == ["a", "b"]
    for key in ("evidence_mean", "belief_mean", "uncertainty_mean", "weight_mean", "weight_top_fraction"):
        assert set(d[key]) == {"a", "b"}
        assert all(type(v) is float for v in d[key].values())
    assert abs(sum(d["weight_mean"].values()) - 1) < 1e-5
    assert abs(sum(d["weight_top_fraction"].values()) - 1) < 1e-6
    for k in ("a", "b"):
        assert abs(d["belief_mean"][k] + d["uncertainty_mean"][k] - 1) < 1e-5
    assert type(d["fused_uncertainty_mean"]) is float
    assert d["belief_scale_min"] <= 1.0 <= d["belief_scale_max"]
    assert d["path"] in ("reference",) or isinstance(d["path"], str)


def test_calibrate_tensors_global_scope_pools_groups(ns, rng):
    shapes = [(3, 4), (5,)]
    per_tensor = [
        {k: bc.GradientStats.from_samples(ns.asarray(rng.normal(i, 1 + i, size=(6,) + sh))) for k in "ab"}
        for i, sh in enumerate(shapes)
    ]
    local = bc.calibrate_tensors(per_tensor, bc.CalibrationConfig(scope="tensor"))
    for cal, srcs in zip(local, per_tensor):
        ns.close(cal.gradient, ns.to_numpy(bc.calibrate(srcs).gradient))
    pooled = bc.calibrate_tensors(per_tensor, bc.CalibrationConfig(scope="global"))
    # the global group equals one calibration of the flattened, concatenated tensors
    flat = {}
    for k in "ab":
        ms, m2s = [], []
        for srcs in per_tensor:
            st = srcs[k]
            ms.append(ns.to_numpy(st.mean).ravel())
            m2s.append(ns.to_numpy(st.m2).ravel())
        flat[k] = (6.0, np.concatenate(ms), np.concatenate(m2s))
    g, *_ = oracle.calibrate(list(flat.values()))
    got = np.concatenate([ns.to_numpy(c.gradient).ravel() for c in pooled])
    np.testing.assert_allclose(got, g, rtol=ns.rtol * 10, atol=ns.atol * 10)
    assert [tuple(c.gradient.shape) for c in pooled] == shapes


def test_empty_dimension_does_not_poison_the_group(ns):
    """A dimension with n = 0 (but stray M2) is ignored by the pooled variance."""
    counts = np.array([0.0, 3.0, 4.0])
    st = bc.GradientStats(ns.asarray(counts), ns.asarray(np.array([0.0, 1.0, -1.0])), ns.asarray(np.array([5.0, 2.0, 3.0])))
    ns.close(st.variance, np.array([0.0, 2 / 3, 3 / 4]))
    other = bc.GradientStats.from_samples(ns.asarray(np.arange(12.0).reshape(4, 3) ** 0.5))
    cal = bc.calibrate([st, other])
    assert np.all(np.isfinite(ns.to_numpy(cal.gradient)))


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
