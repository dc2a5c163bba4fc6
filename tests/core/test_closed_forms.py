"""METHOD.md's closed forms 1-10, each on every namespace and both float dtypes.

Every expected value comes from an independent computation: brute force over
the power set or over subsets, scipy, or the plain NumPy transcription in
``bogc_core.testing.oracle``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats

import bogc_core as bc
from bogc_core import fused_weights
from bogc_core.testing import oracle


def stats_np(ns, samples):
    return bc.GradientStats.from_samples(ns.asarray(samples))


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


def test_permuting_sources_permutes_nothing(ns, rng):
    samples = [rng.normal(loc, sd, size=(12, 9)) for loc, sd in [(0.3, 1), (-0.2, 3), (1, 0.5)]]
    stats = [stats_np(ns, s) for s in samples]
    for weights in ("evidence", "dempster"):
        cfg = bc.CalibrationConfig(weights=weights)
        g = bc.calibrate(stats, cfg).gradient
        g_perm = bc.calibrate([stats[2], stats[0], stats[1]], cfg).gradient
        ns.close(g_perm, ns.to_numpy(g), scale=10)


# 4 --------------------------------------------------------------------------
def test_merge_equals_concatenation(ns, rng):
    x = rng.normal(2.0, 3.0, size=(17, 4, 3))
    a, b = x[:6], x[6:]
    merged = stats_np(ns, a).merge(stats_np(ns, b))
    n, m, m2 = oracle.stats_of(x)
    ns.close(merged.count, n)
    ns.close(merged.mean, m)
    ns.close(merged.m2, m2, scale=10)


def test_rho_one_sequential_updates_equal_batch(ns, rng):
    x = rng.normal(-1.0, 2.0, size=(20, 5))
    chunks = [x[:3], x[3:11], x[11:12], x[12:]]
    acc = stats_np(ns, chunks[0])
    for c in chunks[1:]:
        acc = acc.decay(1.0).merge(stats_np(ns, c))
    n, m, m2 = oracle.stats_of(x)
    post = bc.posterior(acc)
    mu, kappa, alpha, beta = oracle.posterior(n, m, m2)
    ns.close(post.mu, mu, scale=10)
    ns.close(post.beta, beta, scale=10)
    ns.close(post.alpha + 0 * post.mu, alpha)
    ns.close(post.kappa + 0 * post.mu, kappa)


def test_conjugacy_posterior_as_prior(ns64, rng):
    """Updating with batch A, then using that posterior as the prior for B, equals A+B at once."""
    ns = ns64
    x = rng.normal(0.5, 1.5, size=(13, 3))
    a, b = x[:5], x[5:]
    prior = dict(mu0=0.2, kappa0=0.7, alpha0=1.3, beta0=0.9)
    post_a = bc.posterior(stats_np(ns, a), bc.NormalGammaPrior(**prior))
    post_ab = bc.posterior(stats_np(ns, x), bc.NormalGammaPrior(**prior))
    for d in range(3):
        prior_b = bc.NormalGammaPrior(
            mu0=float(ns.to_numpy(post_a.mu)[d]),
            kappa0=float(ns.to_numpy(post_a.kappa + 0 * post_a.mu)[d]),
            alpha0=float(ns.to_numpy(post_a.alpha + 0 * post_a.mu)[d]),
            beta0=float(ns.to_numpy(post_a.beta)[d]),
        )
        post_b = bc.posterior(stats_np(ns, b[:, d : d + 1]), prior_b)
        for name in ("mu", "kappa", "alpha", "beta"):
            got = ns.to_numpy(getattr(post_b, name) + 0 * post_b.mu)[0]
            want = ns.to_numpy(getattr(post_ab, name) + 0 * post_ab.mu)[d]
            np.testing.assert_allclose(got, want, rtol=1e-12)


def test_rho_zero_keeps_only_newest(ns, rng):
    old, new = rng.normal(5, 1, size=(8, 4)), rng.normal(-1, 2, size=(6, 4))
    acc = stats_np(ns, old).decay(0.0).merge(stats_np(ns, new))
    n, m, m2 = oracle.stats_of(new)
    ns.close(acc.count, n)
    ns.close(acc.mean, m)
    ns.close(acc.m2, m2, scale=10)


def test_decay_scales_count_and_m2(ns, rng):
    x = rng.normal(size=(9, 3))
    st = stats_np(ns, x).decay(0.25)
    n, m, m2 = oracle.stats_of(x)
    ns.close(st.count, 0.25 * n)
    ns.close(st.mean, m)
    ns.close(st.m2, 0.25 * m2)


# 5 --------------------------------------------------------------------------
def test_student_t_marginal(ns, rng):
    x = rng.normal(0.4, 1.2, size=(7, 3))
    prior = bc.NormalGammaPrior(mu0=0.1, kappa0=0.5, alpha0=1.5, beta0=0.8)
    post = bc.posterior(stats_np(ns, x), prior)
    mu = ns.to_numpy(post.mu)
    kappa = ns.to_numpy(post.kappa + 0 * post.mu)
    alpha = ns.to_numpy(post.alpha + 0 * post.mu)
    beta = ns.to_numpy(post.beta)
    scale = ns.to_numpy(post.scale())
    ns.close(post.precision(), alpha * kappa / beta)
    for d in range(3):
        for z in (-2.0, -0.3, 0.0, 0.7, 2.5):
            v = mu[d] + z * scale[d]

            def joint(lam, d=d, v=v):
                normal = scipy.stats.norm.pdf(v, mu[d], 1.0 / math.sqrt(kappa[d] * lam))
                return normal * scipy.stats.gamma.pdf(lam, alpha[d], scale=1.0 / beta[d])

            marginal, _ = scipy.integrate.quad(joint, 0, np.inf, epsabs=1e-13, epsrel=1e-11)
            t_pdf = scipy.stats.t.pdf(v, df=2 * alpha[d], loc=mu[d], scale=scale[d])
            np.testing.assert_allclose(marginal, t_pdf, rtol=max(1e-7, 20 * ns.rtol))


# 6 --------------------------------------------------------------------------
@pytest.mark.parametrize("alpha0", [0.0, 1e-9])
def test_inverse_variance_combination(ns, rng, alpha0):
    samples = [rng.normal(loc, sd, size=(10, 6)) for loc, sd in [(0.5, 1), (-0.5, 2), (0.2, 0.7)]]
    cfg = bc.CalibrationConfig(
        evidence_from="precision",
        gamma=1.0,
        prior=bc.NormalGammaPrior(alpha0=alpha0, beta0=0.0),
        scale="none",
        weights="evidence",
    )
    g = bc.calibrate([stats_np(ns, s) for s in samples], cfg).gradient
    ms = np.array([s.mean(0) for s in samples])
    taus = np.array([s.shape[0] / s.var(0) for s in samples])  # n / population variance
    want = 3 * (taus * ms).sum(0) / taus.sum(0)
    ns.close(g, want, scale=10, rtol=1e-6 if ns.dtype_name == "float64" else None)


# 7 --------------------------------------------------------------------------
@pytest.mark.parametrize("evidence_from", ["snr", "precision"])
@pytest.mark.parametrize("weights", ["evidence", "dempster"])
@pytest.mark.parametrize("c", [1e-3, 7.5, 1e4])
def test_scale_equivariance(ns, rng, evidence_from, weights, c):
    samples = [rng.normal(loc, sd, size=(8, 10)) for loc, sd in [(0.2, 1), (-0.1, 0.3)]]
    cfg = bc.CalibrationConfig(evidence_from=evidence_from, weights=weights)
    g1 = bc.calibrate([stats_np(ns, s) for s in samples], cfg).gradient
    gc = bc.calibrate([stats_np(ns, c * s) for s in samples], cfg).gradient
    ns.close(gc, c * ns.to_numpy(g1), scale=20, atol=c * ns.atol * 20)


# 8 --------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["evidence", "dempster", "uniform"])
def test_equal_statistics_give_plain_sum(ns, weights):
    shape = (4, 5)
    m = np.full(shape, 0.37)
    m2 = np.full(shape, 2.5)
    stats = [bc.GradientStats(6.0, ns.asarray(m), ns.asarray(m2)) for _ in range(3)]
    cal = bc.calibrate(stats, bc.CalibrationConfig(weights=weights))
    ns.close(cal.gradient, 3 * m)
    ns.close(cal.weights, np.full((3,) + shape, 1 / 3))
    ns.close(cal.belief_scale, np.ones(shape))


def test_equal_statistics_respect_fused_weights(ns):
    m = np.linspace(-1, 1, 6)
    stats = [bc.GradientStats(5.0, ns.asarray(m), ns.asarray(np.ones(6))) for _ in range(2)]
    # equal statistics per source but not across dimensions: weights stay 1/2
    cal = bc.calibrate(stats, bc.CalibrationConfig(scale="none"), source_weights=[2.0, 0.5])
    ns.close(cal.gradient, 2.5 * m)


# 9 --------------------------------------------------------------------------
def test_two_source_dempster_attribution(ns, rng):
    samples = [rng.normal(loc, sd, size=(9, 12)) for loc, sd in [(0.4, 1), (0.1, 0.5)]]
    cal = bc.calibrate(
        [stats_np(ns, s) for s in samples], bc.CalibrationConfig(weights="dempster")
    )
    e = ns.to_numpy(cal.evidence)
    b, u = e / (e + 1), 1 / (e + 1)
    w1 = (b[0] * u[1] + b[0] * b[1] / 2) / (1 - u[0] * u[1])
    ns.close(cal.weights[0, ...], w1)
    ns.close(cal.weights[1, ...], 1 - w1)


@pytest.mark.parametrize("S", [1, 2, 3, 4, 5, 6])
def test_dempster_shares_match_subset_enumeration(ns, rng, S):
    e = rng.lognormal(0, 1.5, size=(S, 7))
    b, u = e / (e + 1), 1 / (e + 1)
    B = 1 - np.prod(u, axis=0)
    xe = ns.asarray(e)
    w = fused_weights("dempster", xe, ns.asarray(b), ns.asarray(u), ns.asarray(B))
    ns.close(w, oracle.dempster_shares_bruteforce(b), scale=10)


# 10 -------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1e-4, 0.3, 50.0])
def test_snr_invariant_to_one_source_scale(ns, rng, c):
    samples = [rng.normal(loc, sd, size=(8, 10)) for loc, sd in [(0.2, 1), (-0.3, 0.6)]]
    cfg = bc.CalibrationConfig(evidence_from="snr", weights="dempster")
    base = bc.calibrate([stats_np(ns, s) for s in samples], cfg)
    scaled = bc.calibrate([stats_np(ns, c * samples[0]), stats_np(ns, samples[1])], cfg)
    for name in ("evidence", "weights", "uncertainty", "belief_scale"):
        ns.close(getattr(scaled, name), ns.to_numpy(getattr(base, name)), scale=20)
    # only source 0's term changes, by the factor c
    s = ns.to_numpy(base.belief_scale)
    w = ns.to_numpy(base.weights)
    m0 = samples[0].mean(0)
    want = ns.to_numpy(base.gradient) + s * 2 * w[0] * (c - 1) * m0
    ns.close(scaled.gradient, want, scale=50, atol=ns.atol * 50 * max(1.0, c))


# the whole pipeline against the oracle ---------------------------------------
CONFIGS = [
    {},
    {"evidence_from": "precision"},
    {"weights": "dempster"},
    {"weights": "uniform", "gamma": 1.0},
    {"scale": "none", "gamma": 2.0},
    {"s_max": 1.05},
    {"prior_weight": 3.0, "clip": 2.0},
    {"prior": {"mu0": 0.1, "kappa0": 2.0, "alpha0": 2.0, "beta0": 0.5}},
    {"prior": {"alpha0": 3.0}},
]


@pytest.mark.parametrize("opts", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_pipeline_matches_oracle(ns, rng, opts):
    S, shape = 3, (5, 4)
    samples = [rng.normal(rng.normal(0, 0.5, shape), sd, size=(6,) + shape) for sd in (1, 2, 0.5)]
    sources = [oracle.stats_of(s) for s in samples]
    prior = opts.get("prior", {})
    cfg = bc.CalibrationConfig(
        **{k: v for k, v in opts.items() if k != "prior"}, prior=bc.NormalGammaPrior(**prior)
    )
    lambdas = [1.0, 0.5, 2.0]
    cal = bc.calibrate([stats_np(ns, s) for s in samples], cfg, source_weights=lambdas)
    kw = {k: v for k, v in opts.items() if k not in ("prior", "prior_weight")}
    g, w, U, s, e = oracle.calibrate(
        sources, W=opts.get("prior_weight", 1.0), prior=prior, lambdas=lambdas, **kw
    )
    ns.close(cal.evidence, e, scale=10)
    ns.close(cal.weights, w, scale=10)
    ns.close(cal.uncertainty, U, scale=10)
    ns.close(cal.belief_scale, s, scale=10)
    ns.close(cal.gradient, g, scale=10)
    assert len(S * [0]) == cal.weights.shape[0]


def test_per_dimension_counts_match_oracle(ns, rng):
    """Counts that differ per dimension (sparse features) follow the same equations."""
    counts = np.array([3.0, 5.0, 2.0, 8.0])
    m = rng.normal(size=(2, 4))
    m2 = rng.uniform(0.5, 2.0, size=(2, 4)) * counts
    stats = [bc.GradientStats(ns.asarray(counts), ns.asarray(m[k]), ns.asarray(m2[k])) for k in range(2)]
    cal = bc.calibrate(stats)
    g, *_ = oracle.calibrate([(counts, m[k], m2[k]) for k in range(2)])
    ns.close(cal.gradient, g, scale=10)
