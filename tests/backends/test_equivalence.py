"""Every fused path returns what ``reference_calibrate`` returns, for every option.

The reference runs on the same arrays (``fast_path="reference"``), so both see
identical inputs in the same dtype; differences are round-off only and are
bounded per dtype (``RTOL``). The gradient is a signed sum over sources, so
its bound is taken relative to the sum of the magnitudes of its terms,
recomputed here from the reference's weights and the posterior means.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bogc_core import (
    CalibrationConfig,
    GradientStats,
    NormalGammaPrior,
    calibrate,
    calibrate_tensors,
)

from .conftest import RTOL, Fused

FIELDS = ("gradient", "weights", "uncertainty", "belief_scale", "evidence")


def make_sources(fused: Fused, dtype: str, raw: list[tuple]) -> list[GradientStats]:
    """``raw``: one ``(count, mean, m2)`` per source, NumPy float64 (count may be a float)."""
    out = []
    for n, m, m2 in raw:
        out.append(
            GradientStats(
                fused.asarray(n, dtype), fused.asarray(m, dtype), fused.asarray(m2, dtype)
            )
        )
    return out


def random_raw(rng, S, shape, n=8.0, scale=1.0, var_scale=1.0):
    raw = []
    for k in range(S):
        m = rng.normal(size=shape) * scale * (k + 1) * rng.uniform(0.1, 3.0, size=shape)
        m2 = (
            rng.gamma(1.5, size=shape)
            * var_scale
            * (k + 1) ** 2
            * (n - 1 if np.ndim(n) == 0 else 3)
        )
        raw.append((n, m, m2))
    return raw


def check_equal(fused: Fused, dtype: str, raw, config: CalibrationConfig, lambdas=None) -> None:
    stats = make_sources(fused, dtype, raw)
    want = calibrate(stats, dataclasses.replace(config, fast_path="reference"), lambdas)
    got = calibrate(stats, dataclasses.replace(config, fast_path=fused.name), lambdas)
    assert got.flags["path"] == fused.name, got.flags
    assert "fallback" not in got.flags
    assert got.flags["zero_variance_sources"] == want.flags["zero_variance_sources"]
    assert got.sources == want.sources and got.prior_weight == want.prior_weight
    rtol = RTOL[dtype]
    w = {f: fused.to_numpy(getattr(want, f)) for f in FIELDS}
    g = {f: fused.to_numpy(getattr(got, f)) for f in FIELDS}
    for f in FIELDS:
        assert g[f].shape == w[f].shape, f
        assert str(getattr(got, f).dtype) == str(getattr(want, f).dtype), f
        assert np.all(np.isfinite(g[f])), f
    tiny = np.finfo(dtype).tiny
    for f in ("weights", "uncertainty", "belief_scale", "evidence"):
        np.testing.assert_allclose(g[f], w[f], rtol=rtol, atol=tiny, err_msg=f)
    # |g_hat| <= S * s * sum_k w_k |lambda_k mu_k|: bound the error by that scale.
    S = len(raw)
    lam = np.ones(S) if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    k0, mu0 = config.prior.kappa0, config.prior.mu0
    mus = np.stack(
        [
            np.broadcast_to(
                (k0 * mu0 + np.asarray(n) * m) / (k0 + np.asarray(n)) if k0 else m, m.shape
            )
            for n, m, _ in raw
        ]
    )
    lam_b = lam.reshape((S,) + (1,) * (mus.ndim - 1))
    scale = S * w["belief_scale"] * np.sum(w["weights"] * np.abs(lam_b * mus), axis=0)
    err = np.abs(g["gradient"] - w["gradient"])
    assert np.all(err <= 4 * rtol * scale + tiny), float(np.max(err / (scale + tiny)))
    # Diagnostics are computed from the fields, so they work unchanged.
    dg, dw = got.diagnostics, want.diagnostics
    assert dg["path"] == fused.name and dw["path"] == "reference"
    for key in ("fused_uncertainty_mean", "belief_scale_min", "belief_scale_max"):
        assert math.isclose(dg[key], dw[key], rel_tol=10 * rtol), key


CONFIGS = [
    CalibrationConfig(),
    CalibrationConfig(weights="dempster"),
    CalibrationConfig(weights="uniform"),
    CalibrationConfig(evidence_from="precision"),
    CalibrationConfig(scale="none"),
    CalibrationConfig(s_max=1.1, gamma=1.0, prior_weight=0.3),
    CalibrationConfig(prior=NormalGammaPrior(beta0=0.7)),
    CalibrationConfig(prior=NormalGammaPrior(mu0=0.4, kappa0=2.5, alpha0=0.5)),
    CalibrationConfig(
        prior=NormalGammaPrior(mu0=-0.2, kappa0=1.0, alpha0=2.0, beta0=0.1),
        evidence_from="precision",
        weights="dempster",
        prior_weight=3.0,
    ),
    CalibrationConfig(gamma=0.0),
    CalibrationConfig(gamma=2.0, clip=3.0),
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"{c.weights}-{c.evidence_from}-{c.scale}"
)
@pytest.mark.parametrize("S", [1, 2, 3, 6])
def test_random_inputs_all_options(fused, dtype, config, S):
    rng = np.random.default_rng(S)
    raw = random_raw(rng, S, (7, 33))
    check_equal(fused, dtype, raw, config, lambdas=[1.0, 0.5, 2.0, 1.5, 0.25, 3.0][:S])


@pytest.mark.parametrize(
    "case",
    [
        "tiny_var",
        "huge_var",
        "mixed_scales",
        "zero_means",
        "one_zero_var_source",
        "all_zero_var",
        "partial_zero_var",
        "per_dim_counts",
        "broadcast_counts",
        "fractional_counts",
        "big_snr",
    ],
)
@pytest.mark.parametrize(
    "config", CONFIGS[:3] + CONFIGS[7:8], ids=["default", "dempster", "uniform", "kappa0"]
)
# big_snr with kappa0 > 0: (m - mu0)^2 overflows float32, so beta = inf and
# l = -inf on both paths (NumPy warns about the overflow in the reference).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_adversarial_inputs(fused, dtype, case, config):
    rng = np.random.default_rng(7)
    shape = (64, 5)
    S = 3
    f32 = dtype == "float32"
    if case == "tiny_var":
        raw = random_raw(rng, S, shape, scale=1e-12, var_scale=1e-30 if f32 else 1e-200)
    elif case == "huge_var":
        raw = random_raw(rng, S, shape, scale=1e12, var_scale=1e25 if f32 else 1e200)
    elif case == "mixed_scales":
        raw = [
            (8.0, rng.normal(size=shape) * 1e-10, rng.gamma(2, size=shape) * 1e-20),
            (8.0, rng.normal(size=shape) * 1e10, rng.gamma(2, size=shape) * 1e20),
            (3.0, rng.normal(size=shape), rng.gamma(2, size=shape)),
        ]
    elif case == "zero_means":
        raw = random_raw(rng, S, shape)
        for _, m, m2 in raw:
            m[::3] = 0.0
            m2[::5] = 0.0
        # A large pooled variance makes max(mu^2, tiny)/beta underflow where mu == 0.
        raw[0] = (raw[0][0], raw[0][1], raw[0][2] * (1e9 if f32 else 1e300))
    elif case == "one_zero_var_source":
        raw = random_raw(rng, S, shape)
        raw[1] = (raw[1][0], raw[1][1], np.zeros(shape))
    elif case == "all_zero_var":
        raw = [(4.0, rng.normal(size=shape), np.zeros(shape)) for _ in range(S)]
    elif case == "partial_zero_var":
        raw = random_raw(rng, S, shape)
        raw[2][2][:32] = 0.0
    elif case == "per_dim_counts":
        raw = []
        for _k in range(S):
            n = rng.integers(0, 12, size=shape).astype(float)
            m = rng.normal(size=shape) * (n > 0)
            m2 = rng.gamma(2, size=shape) * np.maximum(n - 1, 0)
            raw.append((n, m, m2))
    elif case == "broadcast_counts":
        raw = []
        for _k in range(S):
            n = rng.integers(2, 9, size=(shape[0], 1)).astype(float)
            raw.append((n, rng.normal(size=shape), rng.gamma(2, size=shape)))
    elif case == "fractional_counts":
        raw = [(n * 0.37, m, m2 * 0.37) for n, m, m2 in random_raw(rng, S, shape)]
    else:  # big_snr: mu^2 / beta overflows float32 (not float64), so the safe logs take over
        raw = random_raw(rng, S, shape)
        raw[0] = (raw[0][0], raw[0][1] * 1e25, raw[0][2] * 1e-20)
    check_equal(fused, dtype, raw, config, lambdas=[1.0, 2.0, 0.5])


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    S=st.integers(1, 6),
    D=st.integers(1, 300),
    gamma=st.floats(0.0, 2.0),
    evidence_from=st.sampled_from(["snr", "precision"]),
    weights=st.sampled_from(["evidence", "dempster", "uniform"]),
    scale=st.sampled_from(["belief", "none"]),
    s_max=st.one_of(st.none(), st.floats(0.5, 3.0)),
    W=st.floats(0.05, 20.0),
    kappa0=st.sampled_from([0.0, 0.5, 4.0]),
    beta0=st.one_of(st.none(), st.floats(0.0, 5.0)),
    n=st.floats(2.0, 100.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(
    fused, dtype, S, D, gamma, evidence_from, weights, scale, s_max, W, kappa0, beta0, n, seed
):
    rng = np.random.default_rng(seed)
    config = CalibrationConfig(
        gamma=gamma,
        evidence_from=evidence_from,
        weights=weights,
        scale=scale,
        s_max=s_max,
        prior_weight=W,
        prior=NormalGammaPrior(mu0=0.1, kappa0=kappa0, beta0=beta0),
    )
    raw = random_raw(rng, S, (D,), n=n)
    check_equal(fused, dtype, raw, config, lambdas=list(rng.uniform(0, 2, size=S)))


def test_block_boundaries(fused, dtype, monkeypatch):
    """More dimensions than one block (and not a multiple of it)."""
    from bogc_core.backends import _adapter

    rng = np.random.default_rng(3)
    monkeypatch.setitem(_adapter.BLOCK, "cpu", 1000)
    n = 2 * 1000 + 17
    for config in (CONFIGS[0], CONFIGS[1], CONFIGS[7]):
        check_equal(fused, dtype, random_raw(rng, 3, (n,)), config)
        raw = random_raw(rng, 2, (n,))
        raw[0] = (rng.integers(1, 6, size=n).astype(float), raw[0][1], raw[0][2])
        check_equal(fused, dtype, raw, config)


def test_scope_global_through_fused_path(fused, dtype):
    rng = np.random.default_rng(5)
    tensors = []
    for shape in [(4, 6), (9,), (2, 3, 2)]:
        raw = random_raw(rng, 2, shape)
        st_ = make_sources(fused, dtype, raw)
        tensors.append({"a": st_[0], "b": st_[1]})
    ref = calibrate_tensors(tensors, CalibrationConfig(scope="global", fast_path="reference"))
    got = calibrate_tensors(tensors, CalibrationConfig(scope="global", fast_path=fused.name))
    for r, g in zip(ref, got, strict=False):
        assert g.flags["path"] == fused.name and g.flags["group_size"] == 3
        for f in FIELDS:
            np.testing.assert_allclose(
                fused.to_numpy(getattr(g, f)),
                fused.to_numpy(getattr(r, f)),
                rtol=RTOL[dtype],
                atol=10 * RTOL[dtype] * float(np.max(np.abs(fused.to_numpy(getattr(r, f))))),
            )


def test_zero_means_recompute_nothing(fused, dtype, monkeypatch):
    """The full result's log-score pass keeps the one-log form for zero means."""
    if fused.lib == "cupy":
        pytest.skip("the CuPy kernels have no block recomputation to avoid")
    from bogc_core.backends import _gradient

    def refuse(*args, **kwargs):
        raise AssertionError("block recomputed for zero means")

    monkeypatch.setattr(_gradient, "_score_sums_two_logs", refuse)
    rng = np.random.default_rng(8)
    raw = random_raw(rng, 3, (300,))
    for _, m, _ in raw:
        m[rng.random(300) < 0.4] = 0.0
    check_equal(fused, dtype, raw, CONFIGS[0])
