"""The opt-in ``torch-compiled`` backend returns what ``reference_calibrate`` returns.

Compilations are slow (seconds each), so the cases share a few static option
sets, ``S`` and dtypes: one compilation (dynamic in ``D``) serves every input
of a set, and option values (gamma, clip, prior weight, priors, ``s_max``)
are tensors, not recompilation triggers.
"""

from __future__ import annotations

import numpy as np
import pytest

from bogc_core import CalibrationConfig, NormalGammaPrior, calibrate

from .conftest import Fused
from .test_equivalence import check_equal, make_sources, random_raw

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

COMPILED = Fused("torch-compiled", "torch", "cpu")


@pytest.fixture(scope="module")
def compiled() -> Fused:
    """Skip (with the reason) when torch.compile cannot run on this machine."""
    stats = make_sources(COMPILED, "float32", random_raw(np.random.default_rng(0), 3, (7, 33)))
    cal = calibrate(stats, CalibrationConfig(fast_path="torch-compiled"))
    reason = cal.flags.get("fallback", "")
    if reason.startswith("torch-compiled: torch.compile failed"):
        pytest.skip(reason)
    return COMPILED


def _adversarial(case: str, rng, dtype: str):
    shape, S = (64, 5), 3
    if case == "zero_means":
        raw = random_raw(rng, S, shape)
        for _, m, m2 in raw:
            m[::3] = 0.0
            m2[::5] = 0.0
        raw[0] = (raw[0][0], raw[0][1], raw[0][2] * (1e9 if dtype == "float32" else 1e300))
    elif case == "one_zero_var_source":
        raw = random_raw(rng, S, shape)
        raw[1] = (raw[1][0], raw[1][1], np.zeros(shape))
    elif case == "per_dim_counts":
        raw = []
        for _ in range(S):
            n = rng.integers(0, 12, size=shape).astype(float)
            raw.append(
                (
                    n,
                    rng.normal(size=shape) * (n > 0),
                    rng.gamma(2, size=shape) * np.maximum(n - 1, 0),
                )
            )
    else:  # mixed scales
        raw = [
            (8.0, rng.normal(size=shape) * 1e-10, rng.gamma(2, size=shape) * 1e-20),
            (8.0, rng.normal(size=shape) * 1e10, rng.gamma(2, size=shape) * 1e20),
            (3.0, rng.normal(size=shape), rng.gamma(2, size=shape)),
        ]
    return raw


# Same static options (snr, kappa0 = 0, evidence weights, belief scale) and S = 3:
# one compilation per dtype serves all of these.
DEFAULT_LIKE = [
    CalibrationConfig(),
    CalibrationConfig(s_max=1.1, gamma=1.0, prior_weight=0.3),
    CalibrationConfig(prior=NormalGammaPrior(beta0=0.7)),
    CalibrationConfig(gamma=0.0),
    CalibrationConfig(gamma=2.0, clip=3.0),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_default_options_random_and_adversarial(compiled, dtype):
    rng = np.random.default_rng(1)
    for config in DEFAULT_LIKE:
        check_equal(compiled, dtype, random_raw(rng, 3, (7, 33)), config, lambdas=[1.0, 0.5, 2.0])
    for case in ("zero_means", "one_zero_var_source", "per_dim_counts", "mixed_scales"):
        check_equal(
            compiled, dtype, _adversarial(case, rng, dtype), CalibrationConfig(), [1.0, 2.0, 0.5]
        )


@pytest.mark.parametrize("S", [1, 2])
def test_fewer_sources(compiled, S):
    rng = np.random.default_rng(S)
    check_equal(compiled, "float32", random_raw(rng, S, (50,)), CalibrationConfig())
    raw = random_raw(rng, S, (9, 4))
    raw[0][1][::2] = 0.0  # zero means: -inf scores, excluded from the reference
    check_equal(compiled, "float32", raw, CalibrationConfig(s_max=1.5), lambdas=[2.0, 1.0][:S])


def test_precision_uniform_no_scale(compiled):
    config = CalibrationConfig(evidence_from="precision", weights="uniform", scale="none")
    rng = np.random.default_rng(4)
    check_equal(compiled, "float32", random_raw(rng, 3, (40,)), config)
    raw = random_raw(rng, 3, (40,))
    raw[2] = (raw[2][0], raw[2][1], np.zeros(40))  # zero variance: equal evidence
    check_equal(compiled, "float32", raw, config)


def test_kappa0_priors(compiled):
    rng = np.random.default_rng(5)
    for prior in (
        NormalGammaPrior(mu0=0.4, kappa0=2.5, alpha0=0.5),
        NormalGammaPrior(mu0=-0.2, kappa0=1.0, alpha0=2.0, beta0=0.1),
    ):
        config = CalibrationConfig(prior=prior, prior_weight=3.0)
        check_equal(compiled, "float64", random_raw(rng, 3, (6, 11)), config, [1.0, 0.5, 2.0])


def test_dempster_declines_and_reference_runs(compiled):
    stats = make_sources(compiled, "float64", random_raw(np.random.default_rng(6), 3, (20,)))
    cal = calibrate(stats, CalibrationConfig(fast_path="torch-compiled", weights="dempster"))
    assert cal.flags["path"] == "reference"
    assert cal.flags["fallback"].startswith("torch-compiled: weights='dempster'")


def test_auto_still_picks_torch_fused():
    from bogc_core._dispatch import available

    names = available()
    assert names.index("torch-fused") < names.index("torch-compiled")
    stats = make_sources(COMPILED, "float32", random_raw(np.random.default_rng(7), 2, (10,)))
    assert calibrate(stats).flags["path"] == "torch-fused"


def test_compile_failure_falls_back(monkeypatch):
    from bogc_core.backends import torch_compiled as tc

    def broken(opts, S, dtype):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(tc, "compiled_stages", broken)
    monkeypatch.setattr(tc, "_BROKEN", {})
    stats = make_sources(COMPILED, "float32", random_raw(np.random.default_rng(8), 2, (10,)))
    cal = calibrate(stats, CalibrationConfig(fast_path="torch-compiled"))
    assert cal.flags["path"] == "reference"
    assert "torch.compile failed: RuntimeError: no compiler" in cal.flags["fallback"]
