"""Every error path: the right BOGCError subclass, a message naming argument and remedy,
and the caller's arrays untouched."""

from __future__ import annotations

import numpy as np
import pytest

import bogc_core as bc
from bogc_core.errors import (
    ConfigError,
    DTypeError,
    InsufficientSamplesError,
    NamespaceError,
    NonFiniteError,
    ShapeError,
    TotalConflictError,
)


def test_all_errors_are_bogc_and_value_errors():
    for cls in (ConfigError, DTypeError, InsufficientSamplesError, NamespaceError, NonFiniteError, ShapeError, TotalConflictError):
        assert issubclass(cls, bc.BOGCError)
        assert issubclass(cls, ValueError)


def test_nan_and_inf_samples(ns):
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((4, 3))
        x[2, 1] = bad
        with pytest.raises(NonFiniteError, match=r"x: contains NaN or infinite.*learning rate"):
            bc.GradientStats.from_samples(ns.asarray(x))


def test_nan_in_statistics_is_caught_by_calibrate(ns):
    m = np.ones(3)
    m[1] = np.nan
    bad = bc.GradientStats(3.0, ns.asarray(m), ns.asarray(np.ones(3)))
    good = bc.GradientStats(3.0, ns.asarray(np.ones(3)), ns.asarray(np.ones(3)))
    with pytest.raises(NonFiniteError, match=r"stats_per_source\['1'\]\.mean"):
        bc.calibrate([good, bad])


def test_too_few_samples(ns):
    one = bc.GradientStats.from_samples(ns.asarray(np.ones((1, 4))))
    with pytest.raises(InsufficientSamplesError, match=r"fewer than 2.*per_example.*microbatch.*steps.*beta0"):
        bc.calibrate([one, one])
    # an explicit beta0 makes the variance identifiable from the prior alone
    cfg = bc.CalibrationConfig(prior=bc.NormalGammaPrior(beta0=1.0))
    g = ns.to_numpy(bc.calibrate([one, one], cfg).gradient)
    assert np.all(np.isfinite(g))


def test_no_samples(ns):
    with pytest.raises(InsufficientSamplesError, match=r"x: has no samples"):
        bc.GradientStats.from_samples(ns.asarray(np.ones((0, 3))))


def test_shape_mismatch_between_sources(ns):
    a = bc.GradientStats.from_samples(ns.asarray(np.ones((3, 4))))
    b = bc.GradientStats.from_samples(ns.asarray(np.ones((3, 5))))
    with pytest.raises(ShapeError, match=r"stats_per_source\['1'\]: shape \(5,\) does not match \(4,\)"):
        bc.calibrate([a, b])
    with pytest.raises(ShapeError, match=r"other: shape"):
        a.merge(b)


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


def test_mixed_namespaces():
    torch = pytest.importorskip("torch")
    a = bc.GradientStats.from_samples(np.ones((3, 2)) + np.arange(6.0).reshape(3, 2))
    b = bc.GradientStats.from_samples(torch.ones((3, 2), dtype=torch.float64) + torch.arange(6.0, dtype=torch.float64).reshape(3, 2))
    with pytest.raises(NamespaceError, match=r"different libraries.*convert all inputs"):
        bc.calibrate([a, b])


def test_mixed_devices():
    xp = pytest.importorskip("array_api_strict")
    x = np.arange(6.0).reshape(3, 2)
    a = bc.GradientStats.from_samples(xp.asarray(x))
    b = bc.GradientStats.from_samples(xp.asarray(x, device=xp.Device("device1")))
    with pytest.raises(NamespaceError, match=r"different devices.*move all inputs"):
        bc.calibrate([a, b])


def test_mixed_and_integer_dtypes(ns):
    a = bc.GradientStats.from_samples(ns.asarray(np.arange(6.0).reshape(3, 2)))
    other = "float64" if ns.dtype_name == "float32" else "float32"
    if ns.name == "jax" and ns.dtype_name == "float32":
        other = "float16"  # without 64-bit mode JAX turns float64 into float32
    x = _cast(ns, other)  # GradientStats built directly: from_samples keeps float16 in float32
    b = bc.GradientStats(x[0, ...] * 0 + 3, x[0, ...], x[1, ...])
    with pytest.raises(DTypeError, match=r"mixed dtypes.*cast all inputs"):
        bc.calibrate([a, b])
    with pytest.raises(DTypeError, match=r"x: dtype .* is not real floating"):
        bc.GradientStats.from_samples(ns.xp.asarray([[1, 2], [3, 4]]))


def _cast(ns, dtype_name):
    from bogc_core.testing import Backend

    return Backend(ns.name).namespace(dtype_name).asarray(np.arange(6.0).reshape(3, 2) ** 2)


def test_not_an_array():
    with pytest.raises(NamespaceError, match=r"x: expected an array.*asarray"):
        bc.GradientStats.from_samples([[1.0, 2.0], [3.0, 4.0]])


def test_bad_inputs_to_calibrate(ns):
    st = bc.GradientStats.from_samples(ns.asarray(np.arange(6.0).reshape(3, 2)))
    with pytest.raises(ShapeError, match=r"stats_per_source: empty"):
        bc.calibrate([])
    with pytest.raises(ShapeError, match=r"single GradientStats"):
        bc.calibrate(st)
    with pytest.raises(ShapeError, match=r"expected GradientStats, got ndarray"):
        bc.calibrate([st, np.ones(2)])
    with pytest.raises(ShapeError, match=r"source_weights: 1 values for 2 sources"):
        bc.calibrate([st, st], source_weights=[1.0])
    with pytest.raises(ShapeError, match=r"source_weights: keys must match.*missing \['b'\]"):
        bc.calibrate({"a": st, "b": st}, source_weights={"a": 1.0})
    with pytest.raises(ConfigError, match=r"config: expected CalibrationConfig"):
        bc.calibrate([st], config={"gamma": 1})


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"gamma": -1.0}, r"gamma: must be a finite number >= 0"),
        ({"gamma": float("nan")}, r"gamma"),
        ({"evidence_from": "variance"}, r"evidence_from: must be one of \('snr', 'precision'\)"),
        ({"prior_weight": 0.0}, r"prior_weight: must be a finite number > 0"),
        ({"weights": "softmax"}, r"weights: must be one of"),
        ({"scale": "max"}, r"scale: must be one of"),
        ({"s_max": -2.0}, r"s_max: must be None or a number > 0"),
        ({"clip": 0.0}, r"clip: must be a number > 0"),
        ({"scope": "layer"}, r"scope: must be one of \('tensor', 'global'\)"),
        ({"prior": {"alpha0": 1}}, r"prior: must be a NormalGammaPrior"),
    ],
)
def test_config_validation(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        bc.CalibrationConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"kappa0": -1.0}, r"kappa0: must be >= 0"),
        ({"alpha0": -0.5}, r"alpha0: must be >= 0"),
        ({"beta0": -1.0}, r"beta0: must be >= 0, or None"),
        ({"mu0": float("inf")}, r"mu0: must be a finite real number"),
    ],
)
def test_prior_validation(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        bc.NormalGammaPrior(**kwargs)


def test_decay_range(ns):
    st = bc.GradientStats.from_samples(ns.asarray(np.arange(6.0).reshape(3, 2)))
    for rho in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"rho: must lie in \[0, 1\]"):
            st.decay(rho)


def test_unknown_fast_path(ns):
    st = bc.GradientStats.from_samples(ns.asarray(np.arange(6.0).reshape(3, 2)))
    with pytest.raises(ConfigError, match=r"fast_path: 'warp' is not available"):
        bc.calibrate([st, st], bc.CalibrationConfig(fast_path="warp"))
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match=r"fast_path: 'warp'"):
        bc.calibrate([st, st], bc.CalibrationConfig(backend="warp"))


def test_total_conflict(ns):
    # two opinions fully committed to different singletons: C = 1
    a = bc.Opinion(ns.asarray(np.array([[1.0, 0.0]])), ns.asarray(np.array([0.0])))
    b = bc.Opinion(ns.asarray(np.array([[0.0, 1.0]])), ns.asarray(np.array([0.0])))
    with pytest.raises(TotalConflictError, match=r"total conflict.*prior_weight"):
        bc.reduced_dempster(a, b)
    with pytest.raises(TotalConflictError):
        bc.combine([a, b])


def test_opinion_shapes(ns):
    with pytest.raises(ShapeError, match=r"belief: shape"):
        bc.Opinion(ns.asarray(np.ones((3, 2))), ns.asarray(np.ones(2)))
    a = bc.Opinion(ns.asarray(np.full((3, 2), 0.25)), ns.asarray(np.full(3, 0.5)))
    b = bc.Opinion(ns.asarray(np.full((3, 1), 0.5)), ns.asarray(np.full(3, 0.5)))
    with pytest.raises(ShapeError, match=r"b: belief shape"):
        bc.reduced_dempster(a, b)
    with pytest.raises(ShapeError, match=r"opinions: empty"):
        bc.combine([])
    with pytest.raises(ConfigError, match=r"prior_weight: must be > 0"):
        bc.Opinion.from_evidence(ns.asarray(np.ones(3)), prior_weight=0.0)
    with pytest.raises(ConfigError, match=r"like: pass an array"):
        bc.Opinion.vacuous((3,))


def test_evidence_errors(ns):
    post = bc.posterior(bc.GradientStats.from_samples(ns.asarray(np.arange(6.0).reshape(3, 2))))
    with pytest.raises(ShapeError, match=r"posteriors: empty"):
        bc.evidence([])
    with pytest.raises(ConfigError, match=r"evidence_from"):
        bc.evidence([post], evidence_from="x")
    other = bc.posterior(bc.GradientStats.from_samples(ns.asarray(np.arange(9.0).reshape(3, 3))))
    with pytest.raises(ShapeError, match=r"posteriors\[1\]: shape"):
        bc.evidence([post, other])


def test_inputs_never_modified(ns, rng):
    x = [rng.normal(size=(6, 4)) for _ in range(3)]
    arrays = [ns.asarray(v) for v in x]
    stats = [bc.GradientStats.from_samples(a) for a in arrays]
    before = [(ns.to_numpy(s.count).copy(), ns.to_numpy(s.mean).copy(), ns.to_numpy(s.m2).copy()) for s in stats]
    for weights in ("evidence", "dempster", "uniform"):
        _ = bc.calibrate(stats, bc.CalibrationConfig(weights=weights, s_max=1.1)).diagnostics
    stats[0].merge(stats[1]).decay(0.5)
    bc.GradientStats.from_sums(*stats[0].to_sums(shift=stats[0].mean), shift=stats[0].mean)
    for a, v in zip(arrays, x):
        np.testing.assert_array_equal(ns.to_numpy(a), np.asarray(v, dtype=ns.dtype_name).astype(np.float64))
    for s, (n, m, m2) in zip(stats, before):
        np.testing.assert_array_equal(ns.to_numpy(s.count), n)
        np.testing.assert_array_equal(ns.to_numpy(s.mean), m)
        np.testing.assert_array_equal(ns.to_numpy(s.m2), m2)
