"""The dispatcher: fast paths chosen by array type, imported on demand, declines
recorded, broken modules reported; old module paths still importable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import bogc_core as bc
from bogc_core import _dispatch


def _stats(xp_asarray=np.asarray):
    rng = np.random.default_rng(0)
    return [
        bc.GradientStats.from_samples(xp_asarray(rng.normal(size=(6, 5)) * (k + 1)))
        for k in range(2)
    ]


@pytest.fixture
def table(monkeypatch):
    """A private copy of the dispatch table and caches, restored after the test."""
    monkeypatch.setattr(_dispatch, "FAST_PATHS", dict(_dispatch.FAST_PATHS))
    monkeypatch.setattr(_dispatch, "_REGISTRY", {})
    monkeypatch.setattr(_dispatch, "_LOADED", {})
    monkeypatch.setattr(_dispatch, "_LIBRARY_OF_TYPE", {})
    return _dispatch.FAST_PATHS


def _fake_module(monkeypatch, name, *, decline=None, accepts=True):
    mod = types.ModuleType(name)
    calls = []

    def calibrate(space, names, stats, lambdas, config):
        calls.append("calibrate")
        if decline:
            raise bc.Decline(decline)
        cal = bc.calibrate(dict(zip(names, stats)), _ref(config), lambdas)
        cal.flags["path"] = "fake"
        return cal

    def calibrate_gradient(
        space, names, stats, lambdas, config, *, out=None, segments=None, diagnostics=None
    ):
        calls.append("calibrate_gradient")
        if decline:
            raise bc.Decline(decline)
        return bc.calibrate_gradient(
            dict(zip(names, stats)),
            _ref(config),
            source_weights=lambdas,
            out=out,
            segments=segments,
        )

    mod.NAME = "fake"
    mod.accepts = lambda space: accepts
    mod.calibrate = calibrate
    mod.calibrate_gradient = calibrate_gradient
    mod.calls = calls
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def _ref(config):
    import dataclasses

    return dataclasses.replace(config, fast_path="reference")


def test_new_protocol_module_is_used_through_its_functions(table, monkeypatch):
    mod = _fake_module(monkeypatch, "fake_fast_ok")
    table["numpy"] = (("fake", "fake_fast_ok"),)
    stats = _stats()
    cal = bc.calibrate(stats)
    assert cal.flags["path"] == "fake" and mod.calls == ["calibrate"]
    info: dict = {}
    g = bc.calibrate_gradient(stats, diagnostics=info)
    assert mod.calls[-1] == "calibrate_gradient" and info["path"] == "fake"
    np.testing.assert_allclose(g, cal.gradient, rtol=1e-12)
    # chosen by type, cached per type
    assert _dispatch._LIBRARY_OF_TYPE[np.ndarray] == "numpy"


def test_decline_runs_the_reference_and_records_why(table, monkeypatch):
    mod = _fake_module(monkeypatch, "fake_fast_no", decline="odd input")
    table["numpy"] = (("fake", "fake_fast_no"),)
    stats = _stats()
    cal = bc.calibrate(stats)
    want = bc.calibrate(stats, bc.CalibrationConfig(fast_path="reference"))
    assert cal.flags["path"] == "reference" and cal.diagnostics["fallback"] == "fake: odd input"
    np.testing.assert_array_equal(cal.gradient, want.gradient)
    info: dict = {}
    g = bc.calibrate_gradient(stats, diagnostics=info)
    assert info == {"fallback": "fake: odd input", "path": "reference", "zero_variance_sources": []}
    np.testing.assert_allclose(g, want.gradient, rtol=1e-12)
    assert mod.calls == ["calibrate", "calibrate_gradient"]


def test_a_module_that_does_not_accept_is_skipped(table, monkeypatch):
    _fake_module(monkeypatch, "fake_fast_never", accepts=False)
    table["numpy"] = (("fake", "fake_fast_never"),)
    cal = bc.calibrate(_stats())
    assert cal.flags["path"] == "reference" and "fallback" not in cal.flags
    with pytest.raises(bc.ConfigError, match="fast_path: 'fake' does not accept"):
        bc.calibrate(_stats(), bc.CalibrationConfig(fast_path="fake"))


@pytest.mark.parametrize("source", [None, "raise RuntimeError('bug in the module')"])
def test_a_broken_module_raises_fast_path_error(table, monkeypatch, tmp_path, source):
    name = "bogc_broken_fast_path_" + ("missing" if source is None else "buggy")
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
    table["numpy"] = (("broken", name),)
    with pytest.raises(bc.FastPathError, match="broken.*failed to import.*fast_path='reference'"):
        bc.calibrate(_stats())
    # the reference stays reachable
    assert (
        bc.calibrate(_stats(), bc.CalibrationConfig(fast_path="reference")).flags["path"]
        == "reference"
    )


def test_registered_runner_old_style_str_is_a_decline(table):
    xp = pytest.importorskip("array_api_strict")
    seen = []

    def runner(space, names, stats, lambdas, config):
        seen.append(names)
        return "not today"

    bc.register_fast_path("mine", lambda space: space.xp is xp, runner)
    stats = _stats(xp.asarray)
    cal = bc.calibrate(stats)
    assert seen and cal.flags["fallback"] == "mine: not today" and cal.flags["path"] == "reference"
    assert "mine" in bc.fast_paths()
    with pytest.raises(bc.ConfigError, match="name"):
        bc.register_fast_path("reference", lambda space: True, runner)


def test_unknown_and_wrong_library_names(table):
    with pytest.raises(bc.ConfigError, match="fast_path: 'nope' is not available"):
        bc.calibrate(_stats(), bc.CalibrationConfig(fast_path="nope"))
    with pytest.raises(bc.ConfigError, match="for torch arrays, not numpy"):
        bc.calibrate(_stats(), bc.CalibrationConfig(fast_path="torch-fused"))


def test_a_numpy_call_imports_no_other_array_library(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import bogc_core as bc
        x = np.random.default_rng(0).normal(size=(6, 5))
        st = [bc.GradientStats.from_samples(x), bc.GradientStats.from_samples(2 * x + 1)]
        bc.calibrate(st).diagnostics
        bc.calibrate_gradient(st, segments=[2, 3])
        bc.calibrate(st, bc.CalibrationConfig(fast_path="reference"))
        assert bc.calibrate(st).flags["path"] == "numpy-fused"
        bad = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "cupy", "jax", "jaxlib"})
        print(",".join(bad))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == ""


def test_no_old_module_paths_and_function_names_are_not_shadowed(tmp_path):
    code = textwrap.dedent(
        """
        import importlib
        import bogc_core as bc
        assert callable(bc.calibrate) and callable(bc.evidence) and callable(bc.posterior)
        for old in ("calibrate", "evidence", "posterior", "stats", "opinion", "weights",
                    "diagnostics", "dispatch", "_deprecated"):
            try:
                importlib.import_module("bogc_core." + old)
            except ModuleNotFoundError:
                pass
            else:
                raise SystemExit("importable: bogc_core." + old)
        try:
            bc.CalibrationConfig(backend="reference")
        except TypeError:
            pass
        else:
            raise SystemExit("CalibrationConfig took backend=")
        assert not hasattr(bc.CalibrationConfig(), "backend")
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.strip() == "ok"
