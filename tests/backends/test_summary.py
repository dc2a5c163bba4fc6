"""Diagnostics as by-products: ``calibrate_gradient(..., summarize=...)`` equals the
diagnostics of calibrating each segment (or part) with the reference, on every path.

The fast paths accumulate the reductions in the passes that write the
gradient; the reference is :attr:`Calibration.diagnostics` of ``calibrate``
forced onto the reference, one segment at a time (``calibrate_tensors`` with
``scope="global"`` for parts that refine a segment).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from bogc_core import (
    CalibrationConfig,
    ConfigError,
    GradientStats,
    NormalGammaPrior,
    ShapeError,
    calibrate,
    calibrate_gradient,
    calibrate_tensors,
)

from .test_gradient import Path, _paths, _seg_stats, make, random_raw


@pytest.fixture(params=_paths())
def path(request: pytest.FixtureRequest) -> Path:
    return request.param

FLOATS = ("evidence_mean", "belief_mean", "uncertainty_mean", "weight_mean", "weight_top_fraction")
SCALARS = ("fused_uncertainty_mean", "belief_scale_min", "belief_scale_max", "evidence_min",
           "evidence_max")


def assert_same(got: dict, want: dict, rtol: float) -> None:
    """Equal diagnostics: the same keys and flags, floats to round-off."""
    skip = {"path", "kernel", "group_size"}
    assert set(got) - skip == set(want) - skip, (sorted(got), sorted(want))
    for key in FLOATS:
        assert list(got[key]) == list(want[key]), key
        tol = 1.0 / want["num_dims"] + rtol if key == "weight_top_fraction" else rtol
        np.testing.assert_allclose(
            [got[key][s] for s in want[key]], [want[key][s] for s in want[key]], rtol=tol,
            atol=tol if key == "weight_top_fraction" else 0.0, err_msg=key,
        )
    for key in SCALARS:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, err_msg=key)
    for key in ("sources", "num_dims", "num_sources", "nonfinite", "zero_variance",
                "zero_variance_sources"):
        assert got[key] == want[key], key


CONFIGS = {
    "default": CalibrationConfig(),
    "dempster": CalibrationConfig(weights="dempster"),
    "uniform-smax": CalibrationConfig(weights="uniform", s_max=1.5),
    "precision-noscale": CalibrationConfig(evidence_from="precision", scale="none", gamma=0.7),
    "kappa": CalibrationConfig(prior=NormalGammaPrior(kappa0=0.5, mu0=0.1)),
}


def _reference(stats, config, lengths):
    cfg = dataclasses.replace(config, fast_path="reference")
    out, a = [], 0
    for n in lengths:
        seg = _seg_stats(stats, a, a + n)
        out.append(calibrate({f"s{k}": st for k, st in enumerate(seg)}, cfg).diagnostics)
        a += n
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_segment_diagnostics_equal_the_reference(path: Path, name: str, dtype: str) -> None:
    rng = np.random.default_rng(len(name))
    segments = [700, 1, 33000, 5000]  # a block holds several segments; one spans blocks
    raw = random_raw(rng, 3, sum(segments))
    stats = make(path, dtype, raw)
    info: dict = {}
    path.run(stats, None, CONFIGS[name], segments=segments, diagnostics=info, summarize=True)
    got = info["segments"]
    if path.numba and dtype == "float32" and name == "default":
        assert info["kernel"] == "numba"  # the compiled loops' pass C accumulated them
    want = _reference(stats, CONFIGS[name], segments)
    assert len(got) == len(want) == len(segments)
    rtol = 2e-4 if dtype == "float32" else 1e-9
    for g, w in zip(got, want):
        assert g["path"] == path.mod().NAME
        assert_same(g, w, rtol)


def test_zero_variance_source_is_flagged_per_segment(path: Path) -> None:
    rng = np.random.default_rng(5)
    raw = random_raw(rng, 2, 3000)
    m2 = raw[1][2].copy()
    m2[:1000] = 0.0  # source 1 has zero variance in the first segment only
    raw[1] = (raw[1][0], raw[1][1], m2)
    stats = make(path, "float64", raw)
    info: dict = {}
    path.run(stats, None, CalibrationConfig(), segments=[1000, 2000], diagnostics=info,
             summarize=True)
    want = _reference(stats, CalibrationConfig(), [1000, 2000])
    assert [d["zero_variance_sources"] for d in want] == [["s1"], []]
    for g, w in zip(info["segments"], want):
        assert_same(g, w, 1e-9)


@pytest.mark.parametrize("scope_parts", [[300, 400, 2300], [3000]])
def test_parts_of_a_pooled_group_equal_calibrate_tensors_global(scope_parts) -> None:
    """Parts refining one segment: each part's share of the pooled calibration."""
    rng = np.random.default_rng(9)
    raw = random_raw(rng, 3, 3000)
    stats = [GradientStats(n, m, v) for n, m, v in raw]
    for fast_path in ("auto", "reference"):
        cfg = CalibrationConfig(scope="global", fast_path=fast_path)
        info: dict = {}
        calibrate_gradient(stats, cfg, diagnostics=info, summarize=scope_parts)
        per_tensor, a = [], 0
        for n in scope_parts:
            per_tensor.append({str(k): s for k, s in enumerate(_seg_stats(stats, a, a + n))})
            a += n
        want = [c.diagnostics for c in calibrate_tensors(per_tensor, cfg)]
        assert len(info["segments"]) == len(want)
        for g, w in zip(info["segments"], want):
            assert_same(g, w, 1e-9)


def test_summarize_checks_its_arguments() -> None:
    rng = np.random.default_rng(1)
    stats = [GradientStats(n, m, v) for n, m, v in random_raw(rng, 2, 100)]
    with pytest.raises(ConfigError, match="summarize"):
        calibrate_gradient(stats, summarize=True)
    with pytest.raises(ShapeError, match="refine"):
        calibrate_gradient(stats, segments=[50, 50], diagnostics={}, summarize=[40, 60])
    with pytest.raises(ShapeError, match="summing"):
        calibrate_gradient(stats, diagnostics={}, summarize=[40, 40])


def test_summarize_on_n_dimensional_statistics_equals_calibrate() -> None:
    rng = np.random.default_rng(2)
    stats = [GradientStats.from_samples(rng.normal(0.2 * k, 1.0, size=(6, 5, 7))) for k in range(3)]
    info: dict = {}
    calibrate_gradient(stats, diagnostics=info, summarize=True)
    (got,) = info["segments"]
    assert got["path"] == "numpy-fused"
    assert_same(got, calibrate(stats).diagnostics, 1e-9)
    assert math.isfinite(got["belief_scale_max"])


@pytest.mark.parametrize("threads", [1, 2])
def test_the_gradient_does_not_depend_on_the_summary(path: Path, threads: int, monkeypatch) -> None:
    """A diagnostics step writes the bits any other step writes (the compiled loops'
    where they run, the array engine's for any thread count); the summary's sums
    are reduced in block order."""
    from bogc_core.backends import numpy_fused

    monkeypatch.setattr(numpy_fused, "_THREADS", [threads])
    rng = np.random.default_rng(11)
    segments = [5000, 90000, 12]
    raw = random_raw(rng, 3, sum(segments))
    for dtype in ("float32", "float64"):
        stats = make(path, dtype, raw)
        plain = path.to_numpy(path.run(stats, None, CalibrationConfig(), segments=segments))
        info: dict = {}
        summed = path.to_numpy(path.run(stats, None, CalibrationConfig(), segments=segments,
                                        diagnostics=info, summarize=True))
        np.testing.assert_array_equal(summed, plain)
        again: dict = {}
        path.run(stats, None, CalibrationConfig(), segments=segments, diagnostics=again,
                 summarize=True)
        assert again["segments"] == info["segments"]
