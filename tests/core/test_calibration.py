"""Stage 5 (bogc_core._calibration): the whole pipeline against closed forms and the
oracle; calibrate_gradient == calibrate(...).gradient for every option, on every namespace.

The reference of ``calibrate_gradient`` computes only what the gradient needs
(its own code path, no weights or fused uncertainty kept); ``calibrate`` keeps
everything. Both are compared here with each other and with the float64
oracle, for every option of CalibrationConfig, with and without fixed source
weights, ``out`` and ``segments``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import bogc_core as bc
from bogc_core.errors import (
    ConfigError,
    NonFiniteError,
    ShapeError,
)
from bogc_core.testing import oracle

CONFIGS = {
    "default": bc.CalibrationConfig(),
    "precision": bc.CalibrationConfig(evidence_from="precision"),
    "dempster": bc.CalibrationConfig(weights="dempster"),
    "uniform": bc.CalibrationConfig(weights="uniform"),
    "uniform-none": bc.CalibrationConfig(weights="uniform", scale="none"),
    "scale-none": bc.CalibrationConfig(scale="none"),
    "s_max": bc.CalibrationConfig(s_max=1.1),
    "clip": bc.CalibrationConfig(clip=0.7),
    "gamma0": bc.CalibrationConfig(gamma=0.0),
    "gamma2": bc.CalibrationConfig(gamma=2.0),
    "beta0": bc.CalibrationConfig(prior=bc.NormalGammaPrior(beta0=0.3)),
    "kappa0": bc.CalibrationConfig(prior=bc.NormalGammaPrior(mu0=0.2, kappa0=1.5, alpha0=2.0)),
    "prior_weight": bc.CalibrationConfig(prior_weight=3.0, weights="dempster"),
}


def _samples(rng: np.random.Generator, S: int, D: int) -> list[np.ndarray]:
    out = []
    for k in range(S):
        mean = rng.normal(size=D) * (k + 1)
        spread = np.exp(rng.normal(scale=0.7, size=D))
        out.append(mean + spread * rng.normal(size=(5 + 2 * k, D)))
    return out


def _oracle_grad(samples, cfg, lambdas, bounds=None):
    if bounds is None:
        return oracle.calibrate_samples(samples, cfg, lambdas).gradient
    parts = [
        oracle.calibrate_samples([x[:, a:b] for x in samples], cfg, lambdas).gradient
        for a, b in bounds
    ]
    return np.concatenate(parts)


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("lambdas", [None, [0.5, 2.0, 1.0]], ids=["no-lambda", "lambda"])
def test_gradient_equals_calibrate_gradient_for_every_option(ns, key, lambdas):
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    samples = _samples(rng, 3, 7)
    stats = [bc.GradientStats.from_samples(ns.asarray(x)) for x in samples]
    for cfg in (CONFIGS[key], dataclasses.replace(CONFIGS[key], fast_path="reference")):
        full = bc.calibrate(stats, cfg, lambdas)
        info: dict = {}
        g = bc.calibrate_gradient(stats, cfg, source_weights=lambdas, diagnostics=info)
        assert isinstance(g, type(full.gradient)) and g.dtype == full.gradient.dtype
        ns.close(g, ns.to_numpy(full.gradient), scale=10)
        ns.close(g, _oracle_grad(samples, cfg, lambdas), scale=10)
        assert info["path"] == full.flags["path"]


@pytest.mark.parametrize("key", ["default", "dempster", "uniform", "kappa0", "gamma0"])
def test_segments_and_out(ns, key):
    """Each segment is its own group: equal to calibrating the pieces; ``out`` receives it."""
    rng = np.random.default_rng(7)
    lengths = (3, 1, 5)
    bounds = [(0, 3), (3, 4), (4, 9)]
    samples = _samples(rng, 2, sum(lengths))
    stats = [bc.GradientStats.from_samples(ns.asarray(x)) for x in samples]
    lambdas = {"a": 1.5, "b": 0.25}
    named = dict(zip("ab", stats))
    for cfg in (CONFIGS[key], dataclasses.replace(CONFIGS[key], fast_path="reference")):
        pieces = [
            bc.calibrate({k: _piece(st, a, b) for k, st in named.items()}, cfg, lambdas).gradient
            for a, b in bounds
        ]
        want = np.concatenate([ns.to_numpy(p) for p in pieces])
        out = ns.asarray(np.full(sum(lengths), np.nan))
        if ns.name == "jax":  # immutable arrays: a clear error, and the result returned instead
            with pytest.raises(bc.ConfigError, match="out: JAX arrays are immutable"):
                bc.calibrate_gradient(named, cfg, source_weights=lambdas, out=out)
            out = bc.calibrate_gradient(named, cfg, source_weights=lambdas, segments=lengths)
        else:
            got = bc.calibrate_gradient(
                named, cfg, source_weights=lambdas, out=out, segments=lengths
            )
            assert got is out
        ns.close(out, want, scale=10)
        ns.close(out, _oracle_grad(samples, cfg, [1.5, 0.25], bounds), scale=10)


def _piece(st: bc.GradientStats, a: int, b: int) -> bc.GradientStats:
    return bc.GradientStats(st.count, st.mean[a:b], st.m2[a:b])


def test_bad_segments_and_out(ns):
    stats = [
        bc.GradientStats.from_samples(ns.asarray(np.arange(8.0).reshape(2, 4) * k)) for k in (1, 2)
    ]
    with pytest.raises(bc.ShapeError, match="segments"):
        bc.calibrate_gradient(stats, segments=[2, 3])
    with pytest.raises(bc.ShapeError, match="segments"):
        bc.calibrate_gradient(stats, segments=[4, 0])
    with pytest.raises(bc.ShapeError, match="segments"):
        bc.calibrate_gradient(stats, segments=[2.5, 1.5])
    with pytest.raises(bc.ShapeError if ns.name != "jax" else bc.ConfigError, match="out"):
        bc.calibrate_gradient(stats, out=ns.asarray(np.zeros(3)))
    with pytest.raises(bc.ConfigError, match="diagnostics"):
        bc.calibrate_gradient(stats, diagnostics=[])


def test_zero_variance_is_reported_by_the_gradient_path(ns):
    m = np.array([0.5, -1.0, 2.0])
    stats = {
        "a": bc.GradientStats(4.0, ns.asarray(m), ns.asarray(np.zeros(3))),
        "b": bc.GradientStats(4.0, ns.asarray(2 * m), ns.asarray(np.ones(3))),
    }
    info: dict = {}
    g = bc.calibrate_gradient(stats, bc.CalibrationConfig(fast_path="reference"), diagnostics=info)
    assert info["zero_variance_sources"] == ["a"] and info["path"] == "reference"
    ns.close(g, 3 * m)


# the pipeline against closed forms and the oracle ---------------------------
def stats_np(ns, samples):
    return bc.GradientStats.from_samples(ns.asarray(samples))


def test_permuting_sources_permutes_nothing(ns, rng):
    samples = [rng.normal(loc, sd, size=(12, 9)) for loc, sd in [(0.3, 1), (-0.2, 3), (1, 0.5)]]
    stats = [stats_np(ns, s) for s in samples]
    for weights in ("evidence", "dempster"):
        cfg = bc.CalibrationConfig(weights=weights)
        g = bc.calibrate(stats, cfg).gradient
        g_perm = bc.calibrate([stats[2], stats[0], stats[1]], cfg).gradient
        ns.close(g_perm, ns.to_numpy(g), scale=10)


# 6 --------------------------------------------------------------------------
@pytest.mark.parametrize("alpha0", [0.0, 1e-9])
def test_inverse_variance_combination(ns, rng, alpha0):
    samples = [rng.normal(loc, sd, size=(10, 6)) for loc, sd in [(0.5, 1), (-0.5, 2), (0.2, 0.7)]]
    cfg = bc.CalibrationConfig(
        evidence_from="precision",
        gamma=1.0,
        prior=bc.NormalGammaPrior(alpha0=alpha0, beta0=0.0),
        scale="none",
        weights="evidence",
    )
    g = bc.calibrate([stats_np(ns, s) for s in samples], cfg).gradient
    ms = np.array([s.mean(0) for s in samples])
    taus = np.array([s.shape[0] / s.var(0) for s in samples])  # n / population variance
    want = 3 * (taus * ms).sum(0) / taus.sum(0)
    ns.close(g, want, scale=10, rtol=1e-6 if ns.dtype_name == "float64" else None)


# 7 --------------------------------------------------------------------------
@pytest.mark.parametrize("evidence_from", ["snr", "precision"])
@pytest.mark.parametrize("weights", ["evidence", "dempster"])
@pytest.mark.parametrize("c", [1e-3, 7.5, 1e4])
def test_scale_equivariance(ns, rng, evidence_from, weights, c):
    samples = [rng.normal(loc, sd, size=(8, 10)) for loc, sd in [(0.2, 1), (-0.1, 0.3)]]
    cfg = bc.CalibrationConfig(evidence_from=evidence_from, weights=weights)
    g1 = bc.calibrate([stats_np(ns, s) for s in samples], cfg).gradient
    gc = bc.calibrate([stats_np(ns, c * s) for s in samples], cfg).gradient
    ns.close(gc, c * ns.to_numpy(g1), scale=20, atol=c * ns.atol * 20)


# 8 --------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["evidence", "dempster", "uniform"])
def test_equal_statistics_give_plain_sum(ns, weights):
    shape = (4, 5)
    m = np.full(shape, 0.37)
    m2 = np.full(shape, 2.5)
    stats = [bc.GradientStats(6.0, ns.asarray(m), ns.asarray(m2)) for _ in range(3)]
    cal = bc.calibrate(stats, bc.CalibrationConfig(weights=weights))
    ns.close(cal.gradient, 3 * m)
    ns.close(cal.weights, np.full((3,) + shape, 1 / 3))
    ns.close(cal.belief_scale, np.ones(shape))


# the whole pipeline against the oracle ---------------------------------------
PIPELINE_CONFIGS = [
    {},
    {"evidence_from": "precision"},
    {"weights": "dempster"},
    {"weights": "uniform", "gamma": 1.0},
    {"scale": "none", "gamma": 2.0},
    {"s_max": 1.05},
    {"prior_weight": 3.0, "clip": 2.0},
    {"prior": {"mu0": 0.1, "kappa0": 2.0, "alpha0": 2.0, "beta0": 0.5}},
    {"prior": {"alpha0": 3.0}},
]


@pytest.mark.parametrize("opts", PIPELINE_CONFIGS, ids=[str(c) for c in PIPELINE_CONFIGS])
def test_pipeline_matches_oracle(ns, rng, opts):
    S, shape = 3, (5, 4)
    samples = [rng.normal(rng.normal(0, 0.5, shape), sd, size=(6,) + shape) for sd in (1, 2, 0.5)]
    sources = [oracle.stats_of(s) for s in samples]
    prior = opts.get("prior", {})
    cfg = bc.CalibrationConfig(
        **{k: v for k, v in opts.items() if k != "prior"}, prior=bc.NormalGammaPrior(**prior)
    )
    lambdas = [1.0, 0.5, 2.0]
    cal = bc.calibrate([stats_np(ns, s) for s in samples], cfg, source_weights=lambdas)
    kw = {k: v for k, v in opts.items() if k not in ("prior", "prior_weight")}
    g, w, U, s, e = oracle.calibrate(
        sources, W=opts.get("prior_weight", 1.0), prior=prior, lambdas=lambdas, **kw
    )
    ns.close(cal.evidence, e, scale=10)
    ns.close(cal.weights, w, scale=10)
    ns.close(cal.uncertainty, U, scale=10)
    ns.close(cal.belief_scale, s, scale=10)
    ns.close(cal.gradient, g, scale=10)
    assert len(S * [0]) == cal.weights.shape[0]


def test_per_dimension_counts_match_oracle(ns, rng):
    """Counts that differ per dimension (sparse features) follow the same equations."""
    counts = np.array([3.0, 5.0, 2.0, 8.0])
    m = rng.normal(size=(2, 4))
    m2 = rng.uniform(0.5, 2.0, size=(2, 4)) * counts
    stats = [
        bc.GradientStats(ns.asarray(counts), ns.asarray(m[k]), ns.asarray(m2[k])) for k in range(2)
    ]
    cal = bc.calibrate(stats)
    g, *_ = oracle.calibrate([(counts, m[k], m2[k]) for k in range(2)])
    ns.close(cal.gradient, g, scale=10)


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
    g1 = ns.to_numpy(
        bc.calibrate([bc.GradientStats.from_samples(ns.asarray(s)) for s in samples]).gradient
    )
    gc = ns.to_numpy(
        bc.calibrate([bc.GradientStats.from_samples(ns.asarray(c * s)) for s in samples]).gradient
    )
    assert np.all(np.isfinite(gc))
    np.testing.assert_allclose(gc, c * g1, rtol=1e-9)


def test_zero_variance_group_gives_plain_sum(ns):
    """Deterministic gradients: equal evidence everywhere, flagged in the diagnostics."""
    m = np.linspace(-1, 1, 8)
    det = bc.GradientStats(4.0, ns.asarray(m), ns.asarray(np.zeros(8)))
    other = bc.GradientStats(4.0, ns.asarray(0.5 * m + 0.1), ns.asarray(np.linspace(1, 2, 8)))
    cal = bc.calibrate({"fusion": det, "audio": other})
    ns.close(cal.gradient, m + 0.5 * m + 0.1)
    assert cal.diagnostics["zero_variance"] is True
    assert cal.diagnostics["zero_variance_sources"] == ["fusion"]


def test_calibrate_tensors_global_scope_pools_groups(ns, rng):
    shapes = [(3, 4), (5,)]
    per_tensor = [
        {
            k: bc.GradientStats.from_samples(ns.asarray(rng.normal(i, 1 + i, size=(6,) + sh)))
            for k in "ab"
        }
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


def test_nan_in_statistics_is_caught_by_calibrate(ns):
    m = np.ones(3)
    m[1] = np.nan
    bad = bc.GradientStats(3.0, ns.asarray(m), ns.asarray(np.ones(3)))
    good = bc.GradientStats(3.0, ns.asarray(np.ones(3)), ns.asarray(np.ones(3)))
    with pytest.raises(NonFiniteError, match=r"stats_per_source\['1'\]\.mean"):
        bc.calibrate([good, bad])


def test_shape_mismatch_between_sources(ns):
    a = bc.GradientStats.from_samples(ns.asarray(np.ones((3, 4))))
    b = bc.GradientStats.from_samples(ns.asarray(np.ones((3, 5))))
    with pytest.raises(
        ShapeError, match=r"stats_per_source\['1'\]: shape \(5,\) does not match \(4,\)"
    ):
        bc.calibrate([a, b])
    with pytest.raises(ShapeError, match=r"other: shape"):
        a.merge(b)


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


def test_unknown_fast_path(ns):
    st = bc.GradientStats.from_samples(ns.asarray(np.arange(6.0).reshape(3, 2)))
    with pytest.raises(ConfigError, match=r"fast_path: 'warp' is not available"):
        bc.calibrate([st, st], bc.CalibrationConfig(fast_path="warp"))


def test_inputs_never_modified(ns, rng):
    x = [rng.normal(size=(6, 4)) for _ in range(3)]
    arrays = [ns.asarray(v) for v in x]
    stats = [bc.GradientStats.from_samples(a) for a in arrays]
    before = [
        (ns.to_numpy(s.count).copy(), ns.to_numpy(s.mean).copy(), ns.to_numpy(s.m2).copy())
        for s in stats
    ]
    for weights in ("evidence", "dempster", "uniform"):
        _ = bc.calibrate(stats, bc.CalibrationConfig(weights=weights, s_max=1.1)).diagnostics
    stats[0].merge(stats[1]).decay(0.5)
    bc.GradientStats.from_sums(*stats[0].to_sums(shift=stats[0].mean), shift=stats[0].mean)
    for a, v in zip(arrays, x):
        np.testing.assert_array_equal(
            ns.to_numpy(a), np.asarray(v, dtype=ns.dtype_name).astype(np.float64)
        )
    for s, (n, m, m2) in zip(stats, before):
        np.testing.assert_array_equal(ns.to_numpy(s.count), n)
        np.testing.assert_array_equal(ns.to_numpy(s.mean), m)
        np.testing.assert_array_equal(ns.to_numpy(s.m2), m2)
