"""examples/numpy_logreg.py: its gradients are right, and BOGC trains the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scripttools import load_script

from bogc_core import CalibrationConfig

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "numpy_logreg.py"


@pytest.fixture(scope="module")
def ex() -> ModuleType:
    return load_script(SCRIPT)


def test_per_example_gradients_match_finite_differences(ex: ModuleType) -> None:
    train, _ = ex.make_data(n=200, seed=3)
    batch = train.take(np.arange(40))
    rng = np.random.default_rng(0)
    params = {"wa": rng.normal(size=8) * 0.3, "wb": rng.normal(size=8) * 0.3, "b": np.array(0.2)}
    grads = ex.per_example_grads(params, batch)
    h = 1e-6
    for name, sources in ex.REACH.items():
        for source in ("fusion", "view_a", "view_b"):
            fd = np.zeros(params[name].shape)
            for idx in np.ndindex(params[name].shape):
                up = {k: v.copy() for k, v in params.items()}
                dn = {k: v.copy() for k, v in params.items()}
                up[name][idx] += h
                dn[name][idx] -= h
                fd[idx] = (ex.losses(up, batch)[source] - ex.losses(dn, batch)[source]) / (2 * h)
            if source in sources:
                assert grads[name][source].shape == (40,) + params[name].shape
                np.testing.assert_allclose(
                    grads[name][source].mean(axis=0), fd, rtol=1e-6, atol=1e-8
                )
            else:
                # A source that does not reach the parameter has zero gradient there.
                np.testing.assert_allclose(fd, 0.0, atol=1e-8)


def test_equal_evidence_reproduces_plain_sum_training(ex: ModuleType) -> None:
    # gamma = 0 gives e = 1 everywhere, so every calibrated update is the plain sum
    # (docs/method.md, Stage 5); the two trajectories must coincide.
    train, _ = ex.make_data(n=600, seed=1)
    p_sum, h_sum = ex.train(train, "sum", epochs=3)
    p_eq, h_eq = ex.train(train, "bogc", CalibrationConfig(gamma=0.0), epochs=3)
    for k in p_sum:
        np.testing.assert_allclose(p_eq[k], p_sum[k], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(h_eq, h_sum, rtol=1e-9)


def test_bogc_training_learns(ex: ModuleType) -> None:
    train, test = ex.make_data(seed=0)
    params, history = ex.train(train, "bogc", epochs=6)
    assert history[-1] < 0.5 * np.log(2.0)  # from log 2 at the zero initialisation
    assert ex.accuracy(params, test) > 0.85
    default, _ = ex.train(train, "bogc", epochs=1)
    plain, _ = ex.train(train, "sum", epochs=1)
    # The default calibration really changes the update (it is not the plain sum).
    assert max(float(np.max(np.abs(default[k] - plain[k]))) for k in plain) > 1e-3


def test_bad_method_is_rejected(ex: ModuleType) -> None:
    train, _ = ex.make_data(n=100)
    with pytest.raises(ValueError, match="method"):
        ex.train(train, "pcgrad")


def test_script_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", "3"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["sum", "bogc"]
    assert all(0.8 < float(r[2]) <= 1.0 for r in rows)
