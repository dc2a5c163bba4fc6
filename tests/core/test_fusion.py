"""Stages 3-4 (bogc_core._fusion): opinions and reduced Dempster-Shafer fusion."""

from __future__ import annotations

import numpy as np
import pytest

import bogc_core as bc
from bogc_core.errors import (
    ConfigError,
    ShapeError,
    TotalConflictError,
)
from bogc_core.testing import oracle


def random_opinion(ns, rng, K, dims):
    p = rng.dirichlet(np.ones(K + 1) * 0.7, size=dims)  # (dims, K+1): K beliefs + u
    return bc.Opinion(ns.asarray(p[:, :K]), ns.asarray(p[:, K])), p


# 1 --------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_reduced_rule_equals_dempster_over_power_set(ns, rng, K):
    a, pa = random_opinion(ns, rng, K, 6)
    b, pb = random_opinion(ns, rng, K, 6)
    fused, conflict = bc.reduced_dempster(a, b)
    for d in range(6):
        want_b, want_u, want_c = oracle.dempster_full(pa[d, :K], pa[d, K], pb[d, :K], pb[d, K])
        ns.close(fused.belief[d, ...], want_b)
        ns.close(fused.uncertainty[d], want_u)
        ns.close(conflict[d], want_c, atol=10 * ns.atol + 10 * ns.rtol)


# 2 --------------------------------------------------------------------------
def test_k1_fusion_closed_form(ns, rng):
    e = rng.lognormal(0.0, 2.0, size=(4, 7))
    ops = [bc.Opinion.from_evidence(ns.asarray(e[k]), prior_weight=1.0) for k in range(4)]
    fused, conflict = bc.combine(ops)
    u_want = np.prod(1.0 / (1.0 + e), axis=0)
    ns.close(fused.uncertainty, u_want)
    ns.close(fused.belief[..., 0], 1.0 - u_want)
    ns.close(conflict, np.zeros(7))
    # with W = 1 the fused evidence b/u is prod(1 + e) - 1
    ns.close(fused.evidence(1.0)[..., 0], np.prod(1.0 + e, axis=0) - 1.0, scale=10)
    # the fast K = 1 path gives the same opinion
    fb, fu = bc.fuse_single(ns.asarray(e), 1.0)
    ns.close(fb, 1.0 - u_want)
    ns.close(fu, u_want)


@pytest.mark.parametrize("K", [1, 3])
def test_vacuous_opinion_is_identity(ns, rng, K):
    a, pa = random_opinion(ns, rng, K, 5)
    vac = bc.Opinion.vacuous((5,), K=K, like=a.uncertainty)
    for left, right in [(a, vac), (vac, a)]:
        fused, conflict = bc.reduced_dempster(left, right)
        ns.close(fused.belief, pa[:, :K])
        ns.close(fused.uncertainty, pa[:, K])
        ns.close(conflict, np.zeros(5))


# 3 --------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 3])
def test_fold_commutative_and_associative(ns, rng, K):
    a, _ = random_opinion(ns, rng, K, 8)
    b, _ = random_opinion(ns, rng, K, 8)
    c, _ = random_opinion(ns, rng, K, 8)
    ab, cab = bc.reduced_dempster(a, b)
    ba, cba = bc.reduced_dempster(b, a)
    ns.close(ab.belief, ns.to_numpy(ba.belief))
    ns.close(ab.uncertainty, ns.to_numpy(ba.uncertainty))
    left, c_left = bc.combine([bc.combine([a, b])[0], c])
    right, c_right = bc.combine([a, bc.combine([b, c])[0]])
    ns.close(left.belief, ns.to_numpy(right.belief), scale=10)
    ns.close(left.uncertainty, ns.to_numpy(right.uncertainty), scale=10)
    # the folded conflict is the one-shot conflict, whatever the bracketing
    _, c_all = bc.combine([a, b, c])
    _, c_bc = bc.reduced_dempster(b, c)
    c_right_total = 1 - (1 - ns.to_numpy(c_bc)) * (1 - ns.to_numpy(c_right))
    ns.close(c_all, c_right_total, scale=10)


def test_total_conflict(ns):
    # two opinions fully committed to different singletons: C = 1
    a = bc.Opinion(ns.asarray(np.array([[1.0, 0.0]])), ns.asarray(np.array([0.0])))
    b = bc.Opinion(ns.asarray(np.array([[0.0, 1.0]])), ns.asarray(np.array([0.0])))
    with pytest.raises(TotalConflictError, match=r"total conflict.*prior_weight"):
        bc.reduced_dempster(a, b)
    with pytest.raises(TotalConflictError):
        bc.combine([a, b])


def test_opinion_shapes(ns):
    with pytest.raises(ShapeError, match=r"belief: shape"):
        bc.Opinion(ns.asarray(np.ones((3, 2))), ns.asarray(np.ones(2)))
    a = bc.Opinion(ns.asarray(np.full((3, 2), 0.25)), ns.asarray(np.full(3, 0.5)))
    b = bc.Opinion(ns.asarray(np.full((3, 1), 0.5)), ns.asarray(np.full(3, 0.5)))
    with pytest.raises(ShapeError, match=r"b: belief shape"):
        bc.reduced_dempster(a, b)
    with pytest.raises(ShapeError, match=r"opinions: empty"):
        bc.combine([])
    with pytest.raises(ConfigError, match=r"prior_weight: must be > 0"):
        bc.Opinion.from_evidence(ns.asarray(np.ones(3)), prior_weight=0.0)
    with pytest.raises(ConfigError, match=r"like: pass an array"):
        bc.Opinion.vacuous((3,))
