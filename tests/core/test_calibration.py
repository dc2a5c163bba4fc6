"""calibrate_gradient == calibrate(...).gradient for every option, on every namespace.

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
    parts = [oracle.calibrate_samples([x[:, a:b] for x in samples], cfg, lambdas).gradient for a, b in bounds]
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
        got = bc.calibrate_gradient(named, cfg, source_weights=lambdas, out=out, segments=lengths)
        assert got is out
        ns.close(out, want, scale=10)
        ns.close(out, _oracle_grad(samples, cfg, [1.5, 0.25], bounds), scale=10)


def _piece(st: bc.GradientStats, a: int, b: int) -> bc.GradientStats:
    return bc.GradientStats(st.count, st.mean[a:b], st.m2[a:b])


def test_bad_segments_and_out(ns):
    stats = [bc.GradientStats.from_samples(ns.asarray(np.arange(8.0).reshape(2, 4) * k)) for k in (1, 2)]
    with pytest.raises(bc.ShapeError, match="segments"):
        bc.calibrate_gradient(stats, segments=[2, 3])
    with pytest.raises(bc.ShapeError, match="segments"):
        bc.calibrate_gradient(stats, segments=[4, 0])
    with pytest.raises(bc.ShapeError, match="segments"):
        bc.calibrate_gradient(stats, segments=[2.5, 1.5])
    with pytest.raises(bc.ShapeError, match="out"):
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
