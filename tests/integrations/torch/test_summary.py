"""Diagnostics as by-products: a sampled step calibrates each group once, and its
per-tensor diagnostics equal ``calibrate_tensors`` of the step's statistics."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import numpy as np  # noqa: E402
from bogc_core.backends import _adapter  # noqa: E402
from bogc_core.integrations.torch import Diagnostics, GradientCalibrator  # noqa: E402
from bogc_core.integrations.torch import summary as summary_mod  # noqa: E402
from torchtools import batch, losses_of, make  # noqa: E402

from bogc_core import CalibrationConfig, calibrate_tensors  # noqa: E402

FLOATS = ("evidence_mean", "belief_mean", "uncertainty_mean", "weight_mean", "weight_top_fraction")
SCALARS = ("fused_uncertainty_mean", "belief_scale_min", "belief_scale_max", "evidence_min",
           "evidence_max")


def _count_engine(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = _adapter.gradient

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_adapter, "gradient", counting)
    return calls


@pytest.mark.parametrize("level", ["summary", "full", "none"])
def test_a_diagnostics_step_runs_the_engine_once_per_group(level, monkeypatch):
    m = make()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m,
                             diagnostics=Diagnostics(level=level, every=1))
    calls = _count_engine(monkeypatch)
    diag = cal.backward(losses_of(m, *batch(8)))
    groups = [g for g in cal._workspace.groups if len(g.sources) > 1]
    assert groups and len(calls) == len(groups)
    assert diag["sampled"] is (level != "none")
    if level != "none":
        assert "weight_mean" in diag and diag["parameters"]["enc_a.weight"]["weight_mean"]


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("weights,dtype", [("evidence", torch.float64), ("dempster", torch.float64),
                                           ("evidence", torch.float32)])
def test_step_diagnostics_equal_calibrate_tensors(scope, weights, dtype):
    """float32 with evidence weights runs the compiled loops where numba is installed."""
    m = make(dtype=dtype)
    rtol = 1e-9 if dtype == torch.float64 else 2e-4
    cfg = CalibrationConfig(scope=scope, weights=weights)
    cal = GradientCalibrator(m.named_parameters(), cfg, samples="per_example", model=m,
                             diagnostics=Diagnostics(level="full", every=1, keep_statistics=True))
    diag = cal.backward(losses_of(m, *batch(8, dtype=dtype)))
    stats = cal.last_statistics
    names = [n for n in diag["parameters"] if "weight_mean" in diag["parameters"][n]]
    assert len(names) >= 2
    per = [{s: stats[s][n] for s in stats if n in stats[s]} for n in names]
    want = calibrate_tensors(per, cfg)
    for n, c in zip(names, want):
        got, ref = diag["parameters"][n], c.diagnostics
        assert set(got) - {"path", "kernel"} == set(ref) - {"path", "kernel"}, n
        for key in FLOATS:
            np.testing.assert_allclose([got[key][s] for s in ref[key]],
                                       [ref[key][s] for s in ref[key]], rtol=rtol,
                                       atol=1.0 / got["num_dims"] if key == "weight_top_fraction" else 0,
                                       err_msg=key)
        for key in SCALARS:
            np.testing.assert_allclose(got[key], ref[key], rtol=rtol, err_msg=key)
        for key in ("sources", "num_dims", "nonfinite", "zero_variance_sources", "group_size"):
            assert got.get(key) == ref.get(key), key


def test_group_entries_refuses_a_group_calibrated_without_diagnostics():
    m = make()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m,
                             diagnostics="none")
    cal.backward(losses_of(m, *batch(8)))
    g = next(g for g in cal._workspace.groups if len(g.sources) > 1)
    with pytest.raises(RuntimeError, match="diagnostics"):
        summary_mod.group_entries(g, ["x"], cal.config, "full")
