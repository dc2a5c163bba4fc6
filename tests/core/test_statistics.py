"""Stage 0 (bogc_core._statistics): GradientStats constructors, merge, decay, sums form, checks."""

from __future__ import annotations

import numpy as np
import pytest

import bogc_core as bc
from bogc_core.errors import (
    ConfigError,
    InsufficientSamplesError,
    NonFiniteError,
    ShapeError,
)
from bogc_core.testing import oracle


def stats_np(ns, samples):
    return bc.GradientStats.from_samples(ns.asarray(samples))


# 4 --------------------------------------------------------------------------
def test_merge_equals_concatenation(ns, rng):
    x = rng.normal(2.0, 3.0, size=(17, 4, 3))
    a, b = x[:6], x[6:]
    merged = stats_np(ns, a).merge(stats_np(ns, b))
    n, m, m2 = oracle.stats_of(x)
    ns.close(merged.count, n)
    ns.close(merged.mean, m)
    ns.close(merged.m2, m2, scale=10)


def test_rho_one_sequential_updates_equal_batch(ns, rng):
    x = rng.normal(-1.0, 2.0, size=(20, 5))
    chunks = [x[:3], x[3:11], x[11:12], x[12:]]
    acc = stats_np(ns, chunks[0])
    for c in chunks[1:]:
        acc = acc.decay(1.0).merge(stats_np(ns, c))
    n, m, m2 = oracle.stats_of(x)
    post = bc.posterior(acc)
    mu, kappa, alpha, beta = oracle.posterior(n, m, m2)
    ns.close(post.mu, mu, scale=10)
    ns.close(post.beta, beta, scale=10)
    ns.close(post.alpha + 0 * post.mu, alpha)
    ns.close(post.kappa + 0 * post.mu, kappa)


def test_rho_zero_keeps_only_newest(ns, rng):
    old, new = rng.normal(5, 1, size=(8, 4)), rng.normal(-1, 2, size=(6, 4))
    acc = stats_np(ns, old).decay(0.0).merge(stats_np(ns, new))
    n, m, m2 = oracle.stats_of(new)
    ns.close(acc.count, n)
    ns.close(acc.mean, m)
    ns.close(acc.m2, m2, scale=10)


def test_decay_scales_count_and_m2(ns, rng):
    x = rng.normal(size=(9, 3))
    st = stats_np(ns, x).decay(0.25)
    n, m, m2 = oracle.stats_of(x)
    ns.close(st.count, 0.25 * n)
    ns.close(st.mean, m)
    ns.close(st.m2, 0.25 * m2)


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


def test_nan_and_inf_samples(ns):
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((4, 3))
        x[2, 1] = bad
        with pytest.raises(NonFiniteError, match=r"x: contains NaN or infinite.*learning rate"):
            bc.GradientStats.from_samples(ns.asarray(x))


def test_no_samples(ns):
    with pytest.raises(InsufficientSamplesError, match=r"x: has no samples"):
        bc.GradientStats.from_samples(ns.asarray(np.ones((0, 3))))


def test_bad_stats_shapes(ns):
    with pytest.raises(ShapeError, match=r"m2: shape"):
        bc.GradientStats(2.0, ns.asarray(np.ones(3)), ns.asarray(np.ones(4)))
    with pytest.raises(ShapeError, match=r"count: shape \(2,\) does not broadcast"):
        bc.GradientStats(ns.asarray(np.ones(2)), ns.asarray(np.ones(3)), ns.asarray(np.ones(3)))
    with pytest.raises(ShapeError, match=r"axis: 3 is out of range"):
        bc.GradientStats.from_samples(ns.asarray(np.ones((2, 3))), axis=3)
    with pytest.raises(ConfigError, match=r"count: must be >= 0"):
        bc.GradientStats(-1.0, ns.asarray(np.ones(3)), ns.asarray(np.ones(3)))


def test_negative_m2_rejected(ns):
    st = bc.GradientStats(3.0, ns.asarray(np.ones(2)), ns.asarray(np.array([1.0, -1.0])))
    with pytest.raises(bc.BOGCError, match=r"negative count or m2"):
        bc.calibrate([st, st])


def test_decay_range(ns):
    st = bc.GradientStats.from_samples(ns.asarray(np.arange(6.0).reshape(3, 2)))
    for rho in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"rho: must lie in \[0, 1\]"):
            st.decay(rho)
