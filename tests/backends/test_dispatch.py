"""Choosing a path: auto, forced reference, named backend, visible fallback; inputs untouched."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from bogc_core import (
    CalibrationConfig,
    ConfigError,
    GradientStats,
    InsufficientSamplesError,
    NormalGammaPrior,
    calibrate,
    calibrate_gradient,
)
from bogc_core import fast_paths as available

from .test_equivalence import make_sources, random_raw


def test_cpu_backends_registered():
    names = available()
    assert "numpy-fused" in names
    torch = pytest.importorskip("torch")
    assert torch is not None and "torch-fused" in names


def test_auto_picks_fused_and_reference_is_forced(fused, dtype):
    stats = make_sources(fused, dtype, random_raw(np.random.default_rng(0), 2, (10,)))
    auto = calibrate(stats)
    assert auto.flags["path"] == fused.name and "fallback" not in auto.diagnostics
    ref = calibrate(stats, CalibrationConfig(fast_path="reference"))
    assert ref.flags["path"] == "reference" and ref.diagnostics["path"] == "reference"
    assert "fallback" not in ref.diagnostics
    named = calibrate(stats, CalibrationConfig(fast_path=fused.name))
    assert named.diagnostics["path"] == fused.name


def test_unknown_or_mismatched_backend_is_a_config_error(fused):
    stats = make_sources(fused, "float64", random_raw(np.random.default_rng(0), 2, (4,)))
    with pytest.raises(ConfigError, match="fast_path"):
        calibrate(stats, CalibrationConfig(fast_path="no-such-backend"))
    named = CalibrationConfig(fast_path=fused.name)
    assert calibrate(stats, named).flags["path"] == fused.name
    other = "numpy-fused" if fused.name != "numpy-fused" else "torch-fused"
    if other in available():
        with pytest.raises(ConfigError, match="fast_path"):
            calibrate(stats, CalibrationConfig(fast_path=other))


def test_namespace_without_fused_path_runs_plain_reference():
    xp = pytest.importorskip("array_api_strict")
    raw = random_raw(np.random.default_rng(1), 2, (6,))
    stats = [GradientStats(xp.asarray(n), xp.asarray(m), xp.asarray(m2)) for n, m, m2 in raw]
    cal = calibrate(stats)
    assert cal.flags["path"] == "reference" and "fallback" not in cal.diagnostics


@pytest.mark.parametrize(
    "config,why",
    [
        (CalibrationConfig(clip=200.0), "clip"),
        (CalibrationConfig(clip=20.0, prior_weight=1e-30), "clip"),
        (CalibrationConfig(prior_weight=1e300), "prior_weight"),
    ],
)
def test_unrepresentable_evidence_range_is_refused_on_every_path(fused, config, why):
    """The evidence range a float32 fast path cannot represent gives NaN in the
    reference too: both refuse it at call time, naming the option and the bound."""
    stats = make_sources(fused, "float32", random_raw(np.random.default_rng(2), 3, (8,)))
    for cfg in (config, dataclasses.replace(config, fast_path="reference")):
        with pytest.raises(ConfigError, match=why):
            calibrate(stats, cfg)
        with pytest.raises(ConfigError, match=why):
            calibrate_gradient(stats, cfg)


def test_a_declined_input_falls_back_visibly(fused):
    """An empty parameter is declined by every fast path: the reference runs and says why."""
    stats = make_sources(fused, "float32", random_raw(np.random.default_rng(2), 3, (0,)))
    cfg = CalibrationConfig(prior=NormalGammaPrior(beta0=1.0))  # no dimension to estimate it
    cal = calibrate(stats, cfg)
    want = calibrate(stats, dataclasses.replace(cfg, fast_path="reference"))
    d = cal.diagnostics
    assert d["path"] == "reference"
    assert d["fallback"].startswith(f"{fused.name}: ") and "empty" in d["fallback"]
    info: dict = {}
    g = calibrate_gradient(stats, cfg, diagnostics=info)
    assert info["path"] == "reference" and info["fallback"] == d["fallback"]
    assert tuple(g.shape) == (0,) and tuple(want.gradient.shape) == (0,)


def test_torch_special_inputs_fall_back():
    torch = pytest.importorskip("torch")
    raw = random_raw(np.random.default_rng(3), 2, (5,))
    stats = [
        GradientStats(
            torch.tensor(n, dtype=torch.float64), torch.tensor(m).requires_grad_(), torch.tensor(m2)
        )
        for n, m, m2 in raw
    ]
    cal = calibrate(stats)
    assert cal.flags["path"] == "reference" and "require grad" in cal.flags["fallback"]
    # Half precision is computed in float32 (so the fast path takes it) and
    # returned in the input's dtype.
    half = [
        GradientStats(torch.tensor(n).half(), torch.tensor(m).half(), torch.tensor(m2).half())
        for n, m, m2 in raw
    ]
    cal = calibrate(half)
    assert cal.flags["path"] == "torch-fused" and cal.gradient.dtype == torch.float16
    f32 = [GradientStats(s.count.float(), s.mean.float(), s.m2.float()) for s in half]
    want = calibrate(f32).gradient.half()
    assert torch.equal(cal.gradient, want)
    assert torch.equal(calibrate_gradient(half), want)


def test_errors_match_the_reference(fused):
    """The fused path never hides the reference's errors (it declines, the reference raises)."""
    raw = random_raw(np.random.default_rng(4), 2, (6,), n=1.0)
    stats = make_sources(fused, "float64", raw)
    with pytest.raises(InsufficientSamplesError, match="NormalGammaPrior"):
        calibrate(stats)
    # With an explicit beta0 one sample is enough, on both paths.
    cfg = CalibrationConfig(prior=NormalGammaPrior(beta0=1.0))
    assert calibrate(stats, cfg).flags["path"] == fused.name


@pytest.mark.parametrize(
    "config",
    [
        CalibrationConfig(),
        CalibrationConfig(weights="dempster", prior=NormalGammaPrior(kappa0=1.0, mu0=0.2)),
    ],
)
def test_inputs_are_not_mutated(fused, dtype, config):
    rng = np.random.default_rng(6)
    raw = random_raw(rng, 3, (3, 40))
    n1 = rng.integers(0, 9, size=(3, 40)).astype(float)
    raw[1] = (n1, raw[1][1] * (n1 > 0), raw[1][2] * (n1 > 1))  # consistent: M2 = 0 below 2 samples
    raw[2][1][::4] = 0.0  # zero means take the careful log path
    stats = make_sources(fused, dtype, raw)
    before = [[fused.to_numpy(x).copy() for x in (s.count, s.mean, s.m2)] for s in stats]
    cal = calibrate(stats, dataclasses.replace(config, fast_path=fused.name), [1.0, 2.0, 3.0])
    assert cal.flags["path"] == fused.name
    for s, b in zip(stats, before, strict=False):
        for x, y in zip((s.count, s.mean, s.m2), b, strict=False):
            np.testing.assert_array_equal(fused.to_numpy(x), y)
    # Outputs never alias the inputs.
    for f in ("gradient", "weights", "uncertainty", "belief_scale", "evidence"):
        out = fused.to_numpy(getattr(cal, f))
        assert np.all(np.isfinite(out))


def test_zero_variance_flag_and_uniform_update(fused, dtype):
    """Deterministic gradients: equal evidence everywhere, g_hat = sum_k lambda_k m_k (docs/method.md#calibrated-update)."""
    rng = np.random.default_rng(8)
    ms = [rng.normal(size=(20,)) for _ in range(3)]
    raw = [(4.0, m, np.zeros(20)) for m in ms]
    raw[0] = (4.0, ms[0], rng.gamma(2, size=20))  # only sources 1 and 2 are deterministic
    stats = make_sources(fused, dtype, raw)
    names = {"a": stats[0], "b": stats[1], "c": stats[2]}
    cal = calibrate(names, source_weights={"a": 1.0, "b": 2.0, "c": 0.5})
    assert cal.flags["path"] == fused.name
    assert cal.diagnostics["zero_variance"] and cal.flags["zero_variance_sources"] == ["b", "c"]
    np.testing.assert_allclose(fused.to_numpy(cal.evidence), 1.0)
    want = 1.0 * ms[0] + 2.0 * ms[1] + 0.5 * ms[2]
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(fused.to_numpy(cal.gradient), want, rtol=tol, atol=tol * 10)


def test_closed_form_inverse_variance(fused):
    """Closed form 6 (docs/method.md#identities) recomputed here: g = S * sum_k tau_k m_k / sum_k tau_k."""
    rng = np.random.default_rng(9)
    S, D, n = 3, 50, 6.0
    raw = random_raw(rng, S, (D,), n=n)
    cfg = CalibrationConfig(
        evidence_from="precision",
        gamma=1.0,
        scale="none",
        clip=50.0,
        prior=NormalGammaPrior(alpha0=1e-12, beta0=0.0),
    )
    cal = calibrate(make_sources(fused, "float64", raw), cfg)
    assert cal.flags["path"] == fused.name
    tau = np.stack([(1e-12 + n / 2) * n / (m2 / 2) for _, _, m2 in raw])
    m = np.stack([m for _, m, _ in raw])
    want = S * np.sum(tau * m, axis=0) / np.sum(tau, axis=0)
    np.testing.assert_allclose(fused.to_numpy(cal.gradient), want, rtol=1e-9)


def test_evidence_range_reason_is_precise():
    from bogc_core.backends._adapter import evidence_range_problem

    f32 = np.finfo(np.float32)
    assert evidence_range_problem(CalibrationConfig(), float(f32.tiny), float(f32.max)) is None
    msg = evidence_range_problem(CalibrationConfig(clip=100.0), float(f32.tiny), float(f32.max))
    assert msg and "clip=100.0" in msg
    assert math.exp(100.0) > float(f32.max)  # the reason is real: e would overflow float32


def test_repeatable_bit_for_bit(fused):
    """Same inputs, same result: chunk sums are taken in a fixed order."""
    raw = random_raw(np.random.default_rng(11), 3, (5000,))
    stats = make_sources(fused, "float32", raw)
    a, b = calibrate(stats), calibrate(stats)
    for f in ("gradient", "weights", "uncertainty", "belief_scale", "evidence"):
        np.testing.assert_array_equal(fused.to_numpy(getattr(a, f)), fused.to_numpy(getattr(b, f)))
