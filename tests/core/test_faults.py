"""The fault suite: every bad or extreme input ends in a finite, correct answer or
in a BOGCError subclass that names the argument (no silent NaN, no raw error).

Magnitudes from 1e-30 to 1e30, exact zeros and dead units (a mean of 0 in
every source) are drawn by hypothesis on every namespace.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bogc_core as bc
from bogc_core._evidence import largest_clip
from bogc_core._namespace import resolve
from bogc_core.testing import oracle

FAULT_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _dead_unit_stats(ns, D=5, S=2):
    """Sources whose dimension 0 has mean 0 everywhere (a dead unit)."""
    rng = np.random.default_rng(3)
    out = []
    for k in range(S):
        m = rng.normal(size=D) * (k + 1)
        m[0] = 0.0
        out.append(bc.GradientStats(6.0, ns.asarray(m), ns.asarray(rng.gamma(2.0, size=D))))
    return out


# --------------------------------------------------------------------- clip
@pytest.mark.parametrize("clip", [math.inf, 104.0, 746.0, 1e6])
def test_clip_beyond_the_dtype_is_refused_naming_the_safe_value(ns, clip):
    stats = _dead_unit_stats(ns)
    space = resolve(stats[0].mean)
    limit = largest_clip(space, 1.0, 2)
    if clip <= limit:  # 104 is fine in float64
        g = bc.calibrate_gradient(stats, bc.CalibrationConfig(clip=clip))
        assert np.all(np.isfinite(ns.to_numpy(g)))
        return
    for call in (bc.calibrate, bc.calibrate_gradient):
        with pytest.raises(bc.ConfigError, match=rf"clip: .* use clip <= {limit:.6g}"):
            call(stats, bc.CalibrationConfig(clip=clip))
    with pytest.raises(bc.ConfigError, match="clip"):
        bc.evidence([bc.posterior(s) for s in stats], clip=clip)


def test_the_largest_safe_clip_is_finite_with_dead_units(ns):
    """At the bound itself every output is finite, dead unit included, and equals the oracle."""
    stats = _dead_unit_stats(ns)
    limit = largest_clip(resolve(stats[0].mean), 1.0, 2)
    assert limit > 80  # float32: ~87; float64: ~708
    cfg = bc.CalibrationConfig(clip=limit, gamma=50.0)
    cal = bc.calibrate(stats, cfg)
    for f in ("gradient", "weights", "uncertainty", "belief_scale", "evidence"):
        assert np.all(np.isfinite(ns.to_numpy(getattr(cal, f)))), f
    assert cal.diagnostics["nonfinite"] is False
    assert np.all(ns.to_numpy(cal.evidence)[:, 0] > 0)
    src = [(6.0, ns.to_numpy(s.mean), ns.to_numpy(s.m2)) for s in stats]
    g, *_ = oracle.calibrate(src, gamma=50.0, clip=limit)
    ns.close(cal.gradient, g, scale=100)


def test_nonfinite_flag_follows_the_gradient(ns):
    cal = bc.calibrate(_dead_unit_stats(ns))
    assert cal.diagnostics["nonfinite"] is False
    bad = bc.Calibration(
        ns.asarray([1.0, math.nan]), cal.weights[:, :2], cal.uncertainty[:2],
        cal.belief_scale[:2], cal.evidence[:, :2], cal.sources,
    )  # fmt: skip
    assert bad.diagnostics["nonfinite"] is True


# ------------------------------------------------------- range of the options
def test_prior_weight_and_gamma_beyond_the_dtype(ns):
    stats = _dead_unit_stats(ns)
    big = float(np.finfo(ns.dtype_name).max)
    with pytest.raises(bc.ConfigError, match="prior_weight"):
        bc.calibrate(stats, bc.CalibrationConfig(prior_weight=1e300 if big < 1e300 else 1e307))
    if big < 1e39:
        with pytest.raises(bc.ConfigError, match="gamma"):
            bc.calibrate_gradient(stats, bc.CalibrationConfig(gamma=1e39))
    # a huge but representable gamma is finite: every log ratio hits the clip
    g = bc.calibrate_gradient(stats, bc.CalibrationConfig(gamma=big / 10))
    assert np.all(np.isfinite(ns.to_numpy(g)))


@pytest.mark.parametrize(
    "weights,error,match",
    [
        ([1.0, -0.5], bc.ConfigError, r"source_weights\[1\]: must be a finite number >= 0"),
        ([1.0, None], bc.ConfigError, r"source_weights\[1\]: must be a real number"),
        ([1.0, "ab"], bc.ConfigError, r"source_weights\[1\]"),
        ("ab", bc.ConfigError, "source_weights: must be None, a sequence"),
        (5, bc.ConfigError, "source_weights: must be None, a sequence"),
        ([1.0, math.nan], bc.ConfigError, r"source_weights\[1\]"),
        ([1.0], bc.ShapeError, "one weight per source"),
        ({"0": 1.0}, bc.ShapeError, r"missing \['1'\]"),
        ({"0": 1.0, "1": True}, bc.ConfigError, r"source_weights\['1'\]"),
    ],
)
def test_bad_source_weights_are_typed_errors(ns, weights, error, match):
    stats = _dead_unit_stats(ns)
    for call in (
        lambda: bc.calibrate(stats, None, weights),
        lambda: bc.calibrate_gradient(stats, source_weights=weights),
    ):
        with pytest.raises(error, match=match):
            call()


def test_source_weights_that_overflow(ns):
    stats = _dead_unit_stats(ns)
    if ns.dtype_name == "float32":
        with pytest.raises(bc.ConfigError, match=r"source_weights\[0\].*largest float32"):
            bc.calibrate(stats, None, [1e308, 1.0])
    else:
        with pytest.raises(bc.NonFiniteError, match="overflows"):
            bc.calibrate(stats, None, [1e308, 1.0])
    # without the value scans the caller has opted out of the check
    g = bc.calibrate_gradient(stats, source_weights=[1e30, 1.0], check_values=False)
    assert g.shape == (5,)


# ------------------------------------------------------------ calibrate_tensors
def test_global_scope_checks_namespaces_dtypes_and_keys(ns):
    stats = _dead_unit_stats(ns)
    cfg = bc.CalibrationConfig(scope="global")
    other = "float64" if ns.dtype_name == "float32" else "float32"
    if ns.name != "jax":  # JAX without 64-bit mode has no second float dtype here
        from bogc_core.testing import Backend

        o = Backend(ns.name).namespace(other)
        mixed = bc.GradientStats(6.0, o.asarray(np.ones(5)), o.asarray(np.ones(5)))
        with pytest.raises(bc.DTypeError, match=r"stats_per_tensor\[1\]\['a'\]: mixed dtypes"):
            bc.calibrate_tensors([{"a": stats[0]}, {"a": mixed}], cfg)
    if ns.name != "numpy":
        np_stats = bc.GradientStats(
            6.0, np.ones(5, dtype=ns.dtype_name), np.ones(5, dtype=ns.dtype_name)
        )
        with pytest.raises(bc.NamespaceError, match=r"stats_per_tensor\[1\]\['a'\]"):
            bc.calibrate_tensors([{"a": stats[0]}, {"a": np_stats}], cfg)
    for scope in ("global", "tensor"):
        c = bc.CalibrationConfig(scope=scope)
        with pytest.raises(
            bc.ShapeError, match=r"source_weights: no weight for the sources \['b'\]"
        ):
            bc.calibrate_tensors([{"a": stats[0], "b": stats[1]}], c, {"a": 1.0})
        with pytest.raises(bc.ShapeError, match=r"stats_per_tensor\[0\]: expected a non-empty"):
            bc.calibrate_tensors([{}], c)


# ------------------------------------------------------------- half precision
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_is_accumulated_in_float32(half):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    # gradients ~1e-3: squared deviations ~1e-8 underflow float16's normal range
    x = [rng.normal(1e-3 * (k + 1), 1e-3, size=(16, 40)) for k in range(2)]
    tx = [torch.tensor(a, dtype=getattr(torch, half)) for a in x]
    stats = [bc.GradientStats.from_samples(t) for t in tx]
    assert all(s.m2.dtype == torch.float32 for s in stats)
    want_stats = [oracle.sample_stats(t.double().numpy()) for t in tx]
    for s, (_, m, m2) in zip(stats, want_stats):
        np.testing.assert_allclose(s.m2.double().numpy(), m2, rtol=1e-5)
        np.testing.assert_allclose(s.mean.double().numpy(), m, rtol=1e-5, atol=1e-9)
    # statistics given in half precision: computed in float32, returned in the input dtype
    hstats = [
        bc.GradientStats(s.count.to(t.dtype), s.mean.to(t.dtype), s.m2.to(t.dtype))
        for s, t in zip(stats, tx)
    ]
    cal = bc.calibrate(hstats)
    assert cal.gradient.dtype == getattr(torch, half) and not cal.diagnostics["zero_variance"]
    f32 = [bc.GradientStats(s.count.float(), s.mean.float(), s.m2.float()) for s in hstats]
    want = bc.calibrate(f32, bc.CalibrationConfig(fast_path="reference")).gradient
    torch.testing.assert_close(cal.gradient.float(), want, rtol=1e-2, atol=1e-6)
    assert torch.equal(bc.calibrate_gradient(hstats), cal.gradient)


# --------------------------------------------------------------- from_samples
def test_from_samples_at_the_edge_of_float32():
    x = np.array([[1e30, -1e30], [-1e30, 1e30], [1e30, 1e30]], dtype=np.float32)
    with pytest.raises(bc.NonFiniteError, match="M2 .* exceeds the largest float32"):
        bc.GradientStats.from_samples(x)
    same = np.full((4, 3), 1e30, dtype=np.float32)
    st = bc.GradientStats.from_samples(same)
    np.testing.assert_allclose(st.mean, 1e30, rtol=1e-6)
    np.testing.assert_array_equal(st.m2, 0.0)
    # the sum inside the mean overflows, the mean does not: computed scaled
    big = np.array([[3e38, 3e38], [3e38, -3e38], [3e38, 3e38]], dtype=np.float32)
    st = bc.GradientStats.from_samples(big[:, :1])
    np.testing.assert_allclose(st.mean, [3e38], rtol=1e-6)
    np.testing.assert_array_equal(st.m2, [0.0])
    with pytest.raises(bc.NonFiniteError, match="M2"):
        bc.GradientStats.from_samples(big)


def test_argument_types_are_typed_errors(ns):
    x = ns.asarray(np.ones((3, 2)))
    with pytest.raises(bc.ShapeError, match="axis: must be an int"):
        bc.GradientStats.from_samples(x, axis=1.5)
    st = bc.GradientStats.from_samples(x)
    for rho in (None, "0.5", True):
        with pytest.raises(bc.ConfigError, match="rho"):
            st.decay(rho)
    op = bc.Opinion.from_evidence(ns.asarray([1.0, 2.0]))
    with pytest.raises(bc.ShapeError, match=r"opinions\[0\]: expected Opinion"):
        bc.combine([5, op])
    with pytest.raises(bc.ShapeError, match=r"opinions\[1\]: expected Opinion"):
        bc.combine([op, 5])
    for tol in (-1.0, math.nan, 1.5, "0"):
        with pytest.raises(bc.ConfigError, match="tol"):
            bc.reduced_dempster(op, op, tol=tol)
    for e in ([-1.0, 1.0], [math.nan, 1.0], [math.inf, 1.0]):
        with pytest.raises(bc.ConfigError, match="e: evidence must be finite and >= 0"):
            bc.fuse_single(ns.asarray(np.array(e)[:, None]))
    with pytest.raises(bc.ConfigError, match="prior_weight"):
        bc.fuse_single(ns.asarray(np.ones((2, 1))), prior_weight=-1.0)


def test_distributed_error_is_a_bogc_error():
    assert issubclass(bc.DistributedError, bc.BOGCError)
    assert bc.errors.DistributedError is bc.DistributedError
    assert issubclass(bc.FastPathError, bc.BOGCError)


# ------------------------------------------------------ adversarial magnitudes
@st.composite
def adversarial(draw):
    S = draw(st.integers(1, 3))
    D = draw(st.integers(1, 6))
    exps = draw(st.lists(st.floats(-30, 30), min_size=S, max_size=S))
    seed = draw(st.integers(0, 2**31 - 1))
    dead = draw(st.lists(st.booleans(), min_size=D, max_size=D))
    zero_m2 = draw(st.lists(st.booleans(), min_size=S, max_size=S))
    n = draw(st.sampled_from([1.0, 2.0, 7.0]))
    return S, D, [10.0**e for e in exps], seed, dead, zero_m2, n


@FAULT_SETTINGS
@given(case=adversarial(), weights=st.sampled_from(["evidence", "dempster", "uniform"]))
def test_adversarial_magnitudes_are_finite_or_typed(ns, case, weights):
    S, D, scales, seed, dead, zero_m2, n = case
    rng = np.random.default_rng(seed)
    stats = []
    with np.errstate(over="ignore"):
        for k in range(S):
            m = rng.normal(size=D) * scales[k]
            m[np.array(dead)] = 0.0
            m2 = np.zeros(D) if zero_m2[k] else rng.gamma(2.0, size=D) * scales[k] ** 2
            stats.append(bc.GradientStats(n, ns.asarray(m), ns.asarray(m2)))
    cfg = bc.CalibrationConfig(weights=weights)
    for call in (
        lambda: bc.calibrate(stats, cfg).gradient,
        lambda: bc.calibrate_gradient(stats, cfg),
        lambda: bc.calibrate(stats, cfg, check_values=True).diagnostics,
    ):
        try:
            out = call()
        except bc.BOGCError as exc:
            assert str(exc).split(":")[0]  # names the argument
            continue
        if isinstance(out, dict):
            assert out["nonfinite"] is False
        else:
            assert np.all(np.isfinite(ns.to_numpy(out)))


# ------------------------------------------------------ read-only out (issue 18)
@pytest.fixture
def use_numba():
    """``use_numba(flag)`` switches the compiled loops of the gradient path on or off
    (``_numba_kernel.ENABLED``) for the test; the setting is restored afterwards."""
    from bogc_core.backends import _numba_kernel

    saved = _numba_kernel.ENABLED[0]

    def switch(flag: bool) -> None:
        _numba_kernel.ENABLED[0] = bool(flag) and _numba_kernel.AVAILABLE

    yield switch
    _numba_kernel.ENABLED[0] = saved


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("numba", [True, False])
def test_read_only_out_is_refused_and_left_alone(dtype, numba, use_numba):
    use_numba(numba)
    rng = np.random.default_rng(0)
    stats = [
        bc.GradientStats(6.0, rng.normal(size=40).astype(dtype), rng.gamma(2, size=40).astype(dtype))
        for _ in range(2)
    ]
    copies = [(s.mean.copy(), s.m2.copy()) for s in stats]
    out = np.full(40, 7.0, dtype=dtype)
    out.flags.writeable = False
    with pytest.raises(bc.ConfigError, match=r"out: .*read-only.*writable array, or out=None"):
        bc.calibrate_gradient(stats, out=out)
    np.testing.assert_array_equal(out, 7.0)
    for s, (m, m2) in zip(stats, copies):
        np.testing.assert_array_equal(s.mean, m)
        np.testing.assert_array_equal(s.m2, m2)
    # the same call with a writable array is the plain answer
    w = np.empty(40, dtype=dtype)
    assert bc.calibrate_gradient(stats, out=w) is w
    np.testing.assert_array_equal(w, bc.calibrate_gradient(stats))


# ------------------------------------------------------------- D = 0 (issue 18)
@pytest.mark.parametrize("shape", [(0,), (3, 0)])
@pytest.mark.parametrize("beta0", [None, 0.5])
@pytest.mark.parametrize("fast_path", ["auto", "reference"])
def test_statistics_with_no_elements_give_an_empty_answer(ns, shape, beta0, fast_path):
    """D = 0 is an empty answer (not an error), whatever the prior and the path:
    there is nothing to calibrate, so the empirical-Bayes prior is not needed."""
    z = ns.asarray(np.zeros(shape))
    stats = [bc.GradientStats(4.0, z, z), bc.GradientStats(4.0, z, z)]
    cfg = bc.CalibrationConfig(prior=bc.NormalGammaPrior(beta0=beta0), fast_path=fast_path)
    cal = bc.calibrate(stats, cfg)
    assert tuple(cal.gradient.shape) == shape and tuple(cal.weights.shape) == (2,) + shape
    assert tuple(cal.evidence.shape) == (2,) + shape and tuple(cal.uncertainty.shape) == shape
    assert cal.flags["zero_variance_sources"] == []
    info: dict = {}
    g = bc.calibrate_gradient(stats, cfg, diagnostics=info)
    assert tuple(g.shape) == shape and info["zero_variance_sources"] == []
    if len(shape) == 1:
        assert tuple(bc.calibrate_gradient(stats, cfg, segments=[]).shape) == shape
    # the posterior of empty statistics is empty too (no InsufficientSamplesError)
    assert tuple(bc.posterior(stats[0]).beta.shape) == shape


def test_an_empty_tensor_among_others_is_left_empty():
    rng = np.random.default_rng(1)

    def st(D):
        return bc.GradientStats(4.0, rng.normal(size=D), rng.gamma(2.0, size=D))

    for scope in ("tensor", "global"):
        full, empty = st(5), st(0)
        other_full, other_empty = st(5), st(0)
        got = bc.calibrate_tensors(
            [{"a": full, "b": other_full}, {"a": empty, "b": other_empty}],
            bc.CalibrationConfig(scope=scope),
        )
        alone = bc.calibrate({"a": full, "b": other_full}).gradient
        np.testing.assert_allclose(got[0].gradient, alone, rtol=1e-12)
        assert got[1].gradient.shape == (0,)


# ------------------------------------------- sums over D that overflow (issue 18)
def _overflow_stats(count):
    """float32 statistics each finite (means ~1e16, M2 ~4e33) whose sums over
    D = 2e5 exceed float32's largest number (sum M2 ~ 8e38)."""
    D = 200_000
    out = []
    for k in range(2):
        r = np.random.default_rng(10 + k)
        m = (1e16 * r.uniform(0.5, 1.5, D)).astype(np.float32)
        m2 = (4e33 * r.uniform(0.5, 1.5, D)).astype(np.float32)
        n = count if np.isscalar(count) else np.full(D, count[0], dtype=np.float32)
        out.append((n, m, m2))
    return out


# The reference detects the overflow from an inf sum (NumPy warns once, then it is redone).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("count", [2.0, 10.0, (2.0,)], ids=["n2", "n10", "per-dim"])
@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("numba", [True, False])
def test_float32_sums_over_d_that_overflow_match_float64(count, library, numba, use_numba):
    use_numba(numba)
    raw = _overflow_stats(count)
    ref = bc.calibrate(
        [bc.GradientStats(np.float64(n) if np.isscalar(n) else n.astype(np.float64),
                          m.astype(np.float64), m2.astype(np.float64)) for n, m, m2 in raw],
        bc.CalibrationConfig(fast_path="reference"),
    ).gradient
    if library == "torch":
        torch = pytest.importorskip("torch")
        stats = [bc.GradientStats(torch.as_tensor(n), torch.from_numpy(m), torch.from_numpy(m2))
                 for n, m, m2 in raw]
    else:
        stats = [bc.GradientStats(n, m, m2) for n, m, m2 in raw]

    def host(x):
        return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64)

    for fast_path in ("auto", "reference"):
        cfg = bc.CalibrationConfig(fast_path=fast_path)
        np.testing.assert_allclose(host(bc.calibrate(stats, cfg).gradient), ref, rtol=2e-5)
        np.testing.assert_allclose(host(bc.calibrate_gradient(stats, cfg)), ref, rtol=2e-5)
        np.testing.assert_allclose(
            host(bc.calibrate_gradient(stats, cfg, segments=[150_000, 50_000])),
            np.concatenate([
                bc.calibrate([bc.GradientStats(s.count if np.ndim(s.count) == 0 else s.count[a:b],
                                               s.mean[a:b], s.m2[a:b]) for s in
                              [bc.GradientStats(n if np.isscalar(n) else n.astype(np.float64),
                                                m.astype(np.float64), m2.astype(np.float64))
                               for n, m, m2 in raw]],
                             bc.CalibrationConfig(fast_path="reference")).gradient
                for a, b in ((0, 150_000), (150_000, 200_000))
            ]),
            rtol=2e-5,
        )

