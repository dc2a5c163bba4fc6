"""bogc_core.testing: the namespace table and the oracle are themselves checked.

The oracle must agree with brute force where it has a closed form, must be
able to disagree with a wrong library result, and the namespace table must
round-trip arrays and explain an absent backend.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import bogc_core as bc
from bogc_core.testing import Backend, Namespace, available_backends, oracle


def test_every_backend_is_available_or_says_why():
    found, missing = available_backends()
    assert Backend.NUMPY in found
    assert set(found) | {Backend(k) for k in missing} == set(Backend)
    assert all(isinstance(why, str) and why for why in missing.values())
    only, _ = available_backends(["numpy"])
    assert only == [Backend.NUMPY]


def test_namespace_round_trip(ns: Namespace):
    a = np.array([[1.5, -2.0], [0.25, 3.0]])
    x = ns.asarray(a)
    assert isinstance(x, ns.array_type) and x.dtype == ns.dtype
    np.testing.assert_array_equal(ns.to_numpy(x), a)
    ns.close(x, a)
    with pytest.raises(AssertionError):
        ns.close(x, a + 1.0)


def test_oracle_dempster_shares_match_closed_form_for_two_sources():
    b = np.array([[0.3, 0.9], [0.6, 0.2]])
    u = 1 - b
    w1 = (b[0] * u[1] + b[0] * b[1] / 2) / (1 - u[0] * u[1])
    np.testing.assert_allclose(oracle.dempster_shares_bruteforce(b)[0], w1)


def test_oracle_power_set_rule_matches_pairwise_dempster():
    b1, b2 = np.array([0.2, 0.5]), np.array([0.4, 0.1])
    belief, u, conflict = oracle.dempster_full(b1, 0.3, b2, 0.5)
    fused = oracle.dempster_power_set([oracle.masses(b1, 0.3), oracle.masses(b2, 0.5)])
    assert fused[frozenset()] == pytest.approx(conflict)
    for i in range(2):
        assert fused[frozenset([i])] == pytest.approx(belief[i])
    assert conflict == pytest.approx(
        sum(b1[i] * b2[j] for i, j in itertools.permutations(range(2), 2))
    )


def test_oracle_detects_a_wrong_pipeline():
    rng = np.random.default_rng(0)
    x = [rng.normal(k, 1.0, size=(6, 4)) for k in range(2)]
    cfg = bc.CalibrationConfig()
    want = oracle.calibrate_samples(x, cfg).gradient
    got = bc.calibrate([bc.GradientStats.from_samples(a) for a in x], cfg).gradient
    np.testing.assert_allclose(got, want, rtol=1e-10)
    plain = sum(a.mean(axis=0) for a in x)
    assert not np.allclose(plain, want, rtol=1e-3)


def test_zero_variance_rule_is_in_the_oracle():
    m = [np.array([1.0, -2.0]), np.array([0.5, 0.5])]
    g, _, _, _, e = oracle.calibrate([(4.0, m[0], np.zeros(2)), (4.0, m[1], np.ones(2))])
    np.testing.assert_array_equal(e, 1.0)
    np.testing.assert_allclose(g, m[0] + m[1])


def test_validate_command_runs_on_the_table(capsys):
    from bogc_core import validate

    assert validate.main(["--namespaces", "numpy", "--identities", "2,8"]) == 0
    out = capsys.readouterr().out
    assert "numpy (float64)" in out and "all checks passed" in out
