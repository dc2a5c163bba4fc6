"""Stage 1 (bogc_core._posterior): conjugate update, Student-t marginal, empirical-Bayes prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats

import bogc_core as bc
from bogc_core.errors import (
    ConfigError,
    InsufficientSamplesError,
)


def stats_np(ns, samples):
    return bc.GradientStats.from_samples(ns.asarray(samples))


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


def test_too_few_samples(ns):
    one = bc.GradientStats.from_samples(ns.asarray(np.ones((1, 4))))
    with pytest.raises(
        InsufficientSamplesError, match=r"fewer than 2.*per_example.*microbatch.*steps.*beta0"
    ):
        bc.calibrate([one, one])
    # an explicit beta0 makes the variance identifiable from the prior alone
    cfg = bc.CalibrationConfig(prior=bc.NormalGammaPrior(beta0=1.0))
    g = ns.to_numpy(bc.calibrate([one, one], cfg).gradient)
    assert np.all(np.isfinite(g))


def test_single_sample_dimensions_excluded_from_pooled_variance(ns):
    counts = np.array([1.0, 4.0, 4.0])
    m2 = np.array([0.0, 2.0, 6.0])
    st = bc.GradientStats(ns.asarray(counts), ns.asarray(np.ones(3)), ns.asarray(m2))
    post = bc.posterior(st)
    # vbar = mean(2/4, 6/4) over the dimensions with n >= 2 only
    ns.close(post.beta, 1.0 + m2 / 2)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"kappa0": -1.0}, r"kappa0: must be >= 0"),
        ({"alpha0": -0.5}, r"alpha0: must be >= 0"),
        ({"beta0": -1.0}, r"beta0: must be >= 0, or None"),
        ({"mu0": float("inf")}, r"mu0: must be a finite real number"),
    ],
)
def test_prior_validation(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        bc.NormalGammaPrior(**kwargs)
