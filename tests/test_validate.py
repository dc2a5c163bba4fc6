"""``bogc validate``: every identity passes on a correct install, and each one can fail.

The "can fail" half matters most: each test below breaks one piece of the
library (with monkeypatch, undone after the test) and checks that exactly the
identities built on that piece report FAIL/ERROR and that the command exits 1.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import bogc_core
from bogc_core import validate as v
from bogc_core.testing import TOLERANCE

ALL_KEYS = [i.key for i in v.IDENTITIES]


def _spaces(name: str, dtype: str = "float64") -> list[v.Namespace]:
    found, missing = v.available_namespaces(dtype)
    spaces = [s for s in found if s.name == name]
    if not spaces:
        pytest.skip(f"{name} not available: {missing.get(name)}")
    return spaces


def _by_key(results: list[v.Result]) -> dict[str, v.Result]:
    return {r.identity: r for r in results}


def test_identity_list_covers_method_closed_forms() -> None:
    assert ALL_KEYS == [str(k) for k in range(1, 11)] + ["E"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_all_identities_pass_on_numpy(dtype: str) -> None:
    results = v.run(_spaces("numpy", dtype), dtype=dtype)
    assert [r.identity for r in results] == ALL_KEYS
    bad = [(r.identity, r.status, r.error, r.notes) for r in results if not r.passed]
    assert not bad
    # Errors are real measurements, not zeros: each identity compared something.
    assert all(0 <= r.error <= TOLERANCE[dtype] for r in results)
    assert max(r.error for r in results) > 0


@pytest.mark.parametrize("name", ["array_api_strict", "torch"])
def test_all_identities_pass_on_other_namespaces(name: str) -> None:
    results = v.run(_spaces(name))
    bad = [(r.identity, r.status, r.error, r.notes) for r in results if not r.passed]
    assert not bad


@pytest.mark.slow
@pytest.mark.parametrize("keys", [["1", "2", "3", "4", "5"], ["6", "7", "8", "9", "10", "E"]])
def test_all_identities_pass_on_jax(keys: list[str]) -> None:
    # JAX compiles every eager operation once per shape: ~15-25 s per half on 2 busy cores.
    results = v.run(_spaces("jax"), identities=keys)
    assert [r.identity for r in results] == keys
    bad = [(r.identity, r.status, r.error, r.notes) for r in results if not r.passed]
    assert not bad


def test_jax_column_leaves_x64_setting_alone() -> None:
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp

    before = jnp.asarray(np.ones(2)).dtype
    v.run(_spaces("jax"), identities=["2"])
    assert jnp.asarray(np.ones(2)).dtype == before
    x64 = jax.config.jax_enable_x64  # type: ignore[attr-defined]
    assert bool(x64) is (before == jnp.float64)


# ----------------------------------------------------------- checks can fail
def _broken_merge(self: bogc_core.GradientStats, other: bogc_core.GradientStats) -> Any:
    # Chan's merge without the between-chunk term delta^2 * na * nb / n.
    n = self.count + other.count
    m = (self.count * self.mean + other.count * other.mean) / n
    return bogc_core.GradientStats(n, m, self.m2 + other.m2)


def _unnormalised_dempster(a: Any, b: Any, tol: Any = None) -> Any:
    op, conflict = _ORIG["reduced_dempster"](a, b, tol)
    scale = 1.0 - conflict
    return bogc_core.Opinion(op.belief * scale[..., None], op.uncertainty * scale), conflict


def _wrong_alpha_posterior(stats: Any, prior: Any = None) -> Any:
    post = _ORIG["posterior"](stats, prior)
    return bogc_core.Posterior(post.mu, post.kappa, post.alpha + 0.5, post.beta)


def _mean_not_product(e: Any, prior_weight: float = 1.0) -> Any:
    u = np.mean(prior_weight / (e + prior_weight), axis=0)
    return 1.0 - u, u


def _evidence_instead_of_dempster(
    stats: Any, config: Any = None, source_weights: Any = None
) -> Any:
    if config is not None and config.weights == "dempster":
        config = dataclasses.replace(config, weights="evidence")
    return _ORIG["calibrate"](stats, config, source_weights)


def _scaled_gradient(stats: Any, config: Any = None, source_weights: Any = None) -> Any:
    cal = _ORIG["calibrate"](stats, config, source_weights)
    cal.gradient = cal.gradient * 1.001
    return cal


def _numpy_output(stats: Any, config: Any = None, source_weights: Any = None) -> Any:
    cal = _ORIG["calibrate"](stats, config, source_weights)
    cal.gradient = np.asarray(cal.gradient.detach().cpu())
    return cal


_ORIG = {
    name: getattr(bogc_core, name)
    for name in ("reduced_dempster", "posterior", "fuse_single", "calibrate")
}


@pytest.mark.parametrize(
    "target, replacement, must_fail",
    [
        ("GradientStats.merge", _broken_merge, {"4"}),
        ("reduced_dempster", _unnormalised_dempster, {"1"}),
        ("posterior", _wrong_alpha_posterior, {"4", "5"}),
        ("fuse_single", _mean_not_product, {"2"}),
        ("calibrate", _evidence_instead_of_dempster, {"9"}),
        ("calibrate", _scaled_gradient, {"6", "8", "E"}),
    ],
    ids=["merge", "dempster-norm", "posterior-alpha", "fuse-single", "dempster-weights", "scale"],
)
def test_a_broken_piece_fails_its_identities(
    monkeypatch: pytest.MonkeyPatch, target: str, replacement: Any, must_fail: set[str]
) -> None:
    if target == "GradientStats.merge":
        monkeypatch.setattr(bogc_core.GradientStats, "merge", replacement)
    else:
        monkeypatch.setattr(bogc_core, target, replacement)
    results = _by_key(v.run(_spaces("numpy")))
    failed = {k for k, r in results.items() if not r.passed}
    assert must_fail <= failed, {k: (r.status, r.error) for k, r in results.items()}
    # Identities that do not touch the broken piece still pass.
    assert "1" in must_fail or results["1"].passed
    assert "4" in must_fail or results["4"].passed


def test_wrong_output_namespace_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    spaces = _spaces("torch")
    monkeypatch.setattr(bogc_core, "calibrate", _numpy_output)
    res = _by_key(v.run(spaces, identities=["E"]))["E"]
    assert res.status == "FAIL"
    assert any("not an array of torch" in n for n in res.notes)


def test_an_exception_is_an_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(bogc_core, "combine", boom)
    res = _by_key(v.run(_spaces("numpy"), identities=["1", "4"]))
    assert res["1"].status == "ERROR" and "broken on purpose" in res["1"].notes[0]
    assert res["4"].passed


def test_main_exit_code_and_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    out_json = tmp_path / "r.json"
    assert v.main(["--namespaces", "numpy", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "numpy (float64)" in text and "all checks passed" in text
    for ident in v.IDENTITIES:
        assert ident.title in text
    data = json.loads(out_json.read_text())
    assert {d["identity"] for d in data} == set(ALL_KEYS)

    monkeypatch.setattr(bogc_core, "fuse_single", _mean_not_product)
    assert v.main(["--namespaces", "numpy", "--identities", "2,3"]) == 1
    text = capsys.readouterr().out
    assert "FAIL: identity 2 on numpy" in text and "1 check(s) failed" in text


def test_main_rejects_unknown_names() -> None:
    with pytest.raises(SystemExit) as exc:
        v.main(["--namespaces", "nonesuch"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        v.main(["--identities", "11"])


def test_cli_dispatches_validate(capsys: pytest.CaptureFixture[str]) -> None:
    from bogc_core.integrations import cli

    assert cli.main(["validate", "--namespaces", "numpy", "--identities", "2,8"]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_python_dash_m_runs(tmp_path) -> None:
    assert importlib.util.find_spec("bogc_core.validate") is not None
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bogc_core.validate",
            "--namespaces",
            "numpy",
            "--dtype",
            "both",
            "--identities",
            "1,E",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # outside the checkout: the installed package runs
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "numpy (float32)" in proc.stdout and "numpy (float64)" in proc.stdout
