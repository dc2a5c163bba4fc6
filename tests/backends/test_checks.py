"""The values check of ``calibrate_gradient(check_values=True)``, folded into the passes.

A fast path of the table checks the statistics itself (the compiled loops
count the invalid values in pass B and the non-finite results in the pass
that writes the gradient; the array engine scans first). Whatever path runs,
a bad value raises the error the core's own scan raises, naming the same
array, and leaves ``out`` unchanged; a valid float32 call on the compiled
loops makes no separate scan at all.
"""

from __future__ import annotations

import numpy as np
import pytest

import bogc_core
from bogc_core import BOGCError, CalibrationConfig, GradientStats, calibrate_gradient
from bogc_core._namespace import Space

from .test_gradient import Path, _numba, _paths, make, random_raw

BAD = [("mean", np.nan), ("mean", np.inf), ("m2", np.nan), ("m2", -np.inf), ("m2", np.inf),
       ("m2", -1.0), ("count", np.nan), ("count", -3.0)]


@pytest.fixture(params=[p for p in _paths() if "cuda" not in p.id])
def path(request: pytest.FixtureRequest) -> Path:
    return request.param


def _error(stats, config, **kw) -> tuple[type, str]:
    with pytest.raises(BOGCError) as exc:
        calibrate_gradient(stats, config, **kw)
    return type(exc.value), str(exc.value)


@pytest.mark.parametrize("where,value", BAD)
@pytest.mark.parametrize("segments", [None, [1500, 70000 - 1500]])
def test_a_bad_value_raises_the_reference_error_and_leaves_out_unchanged(
    path: Path, where: str, value: float, segments, monkeypatch
) -> None:
    from bogc_core.backends import _numba_kernel

    monkeypatch.setattr(_numba_kernel, "ENABLED", [path.numba and _numba_kernel.AVAILABLE])
    rng = np.random.default_rng(4)
    raw = random_raw(rng, 3, 70000)
    n, m, v = raw[1]
    m, v = m.copy(), v.copy()
    if where == "mean":
        m[40000] = value
    elif where == "m2":
        v[40000] = value
    else:
        n = value
    raw[1] = (n, m, v)
    stats = make(path, "float32", raw)
    fast = CalibrationConfig()
    ref = CalibrationConfig(fast_path="reference")
    want = _error(stats, ref, segments=segments)
    out = path.asarray(np.full(70000, 7.0), "float32")
    got = _error(stats, fast, segments=segments, out=out)
    assert got == want
    assert np.all(path.to_numpy(out) == 7.0)


def test_a_valid_call_on_the_compiled_loops_scans_nothing(path: Path, monkeypatch) -> None:
    if not path.numba or _numba() is not None:
        pytest.skip("the compiled loops fold the check; the array engine scans first")
    scans: list[str] = []
    real_check, real_finite = GradientStats.check, Space.all_finite

    def check(self, name="stats"):
        scans.append(name)
        return real_check(self, name)

    def all_finite(self, x):
        scans.append("result")
        return real_finite(self, x)

    monkeypatch.setattr(GradientStats, "check", check)
    monkeypatch.setattr(Space, "all_finite", all_finite)
    rng = np.random.default_rng(5)
    stats = make(path, "float32", random_raw(rng, 3, 50000))
    info: dict = {}
    out = path.asarray(np.zeros(50000), "float32")
    calibrate_gradient(stats, out=out, diagnostics=info)
    assert info["kernel"] == "numba" and "finite" not in info
    assert scans == []
    # the same call with the array engine scans every source and the result
    from bogc_core.backends import _numba_kernel

    monkeypatch.setattr(_numba_kernel, "ENABLED", [False])
    calibrate_gradient(stats, out=out)
    assert len(scans) == 4 and scans[-1] == "result"


@pytest.mark.parametrize("scale", ["belief", "none"])
def test_an_overflowing_result_raises_as_the_reference(path: Path, scale: str) -> None:
    rng = np.random.default_rng(6)
    stats = make(path, "float32", random_raw(rng, 3, 40000))
    lam = [1e38] * 3  # S * sum_k w_k lambda_k m_k overflows float32 where |m| > ~1
    want = _error(stats, CalibrationConfig(scale=scale, fast_path="reference"), source_weights=lam)
    assert want[0] is bogc_core.NonFiniteError
    assert _error(stats, CalibrationConfig(scale=scale), source_weights=lam) == want
    info: dict = {}
    path.run(stats, lam, CalibrationConfig(scale=scale), diagnostics=info)
    # the compiled loops take this input: their folded output check found the overflow
    assert info.get("kernel") == ("numba" if path.numba else None)
