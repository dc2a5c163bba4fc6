"""Stage 1: Normal-Gamma posterior of each source's mean gradient (docs/method.md#posterior).

Likelihood ``g^(i) ~ N(mu, 1/lambda)``; prior ``lambda ~ Gamma(alpha0, rate=beta0)``,
``mu | lambda ~ N(mu0, 1/(kappa0 * lambda))``. The posterior is conjugate::

    kappa_n = kappa0 + n
    mu_n    = (kappa0*mu0 + n*m) / kappa_n
    alpha_n = alpha0 + n/2
    beta_n  = beta0 + M2/2 + kappa0*n*(m - mu0)^2 / (2*kappa_n)

and the marginal of ``mu`` is Student-t with ``2*alpha_n`` degrees of freedom,
location ``mu_n`` and squared scale ``beta_n / (alpha_n * kappa_n)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._namespace import resolve
from ._statistics import GradientStats
from ._types import Array, NormalGammaPrior
from .errors import ConfigError, InsufficientSamplesError

__all__ = ["Posterior", "posterior"]


@dataclass(frozen=True, eq=False)
class Posterior:
    """Normal-Gamma posterior ``NG(mu, kappa, alpha, beta)``, elementwise.

    ``mu`` has the parameter's shape; ``kappa`` and ``alpha`` may be 0-d (they
    depend only on the count), ``beta`` has the parameter's shape.
    """

    mu: Array
    kappa: Array
    alpha: Array
    beta: Array

    def precision(self) -> Array:
        """Student-t precision ``tau = alpha * kappa / beta`` (inf where ``beta == 0``)."""
        return self.alpha * self.kappa / self.beta

    def log_precision(self) -> Array:
        """``log(tau)``, finite: each factor is floored at the dtype's smallest normal."""
        space = resolve(self.mu)
        xp, tiny = space.xp, space.tiny
        return (
            xp.log(xp.clip(self.alpha, min=tiny))
            + xp.log(xp.clip(self.kappa, min=tiny))
            - xp.log(xp.clip(self.beta, min=tiny))
        )

    def scale(self) -> Array:
        """Student-t scale ``sqrt(beta / (alpha * kappa))``."""
        xp = resolve(self.mu).xp
        return xp.sqrt(self.beta / (self.alpha * self.kappa))

    def df(self) -> Array:
        """Student-t degrees of freedom ``2 * alpha``."""
        return 2 * self.alpha


def empirical_beta0(stats: GradientStats, alpha0: float) -> Array:
    """``alpha0 * vbar``, ``vbar = mean_d(M2/n)`` over dimensions with ``n >= 2`` (0-d array).

    Raises :class:`InsufficientSamplesError` when no dimension has two samples.
    Statistics with no dimensions (``D = 0``) give 0: there is nothing to
    calibrate, and the result is empty whatever ``beta0`` is.
    """
    space = stats.space
    xp = space.xp
    if math.prod(stats.shape) == 0:
        return space.asarray(0.0)
    valid = xp.astype(stats.count >= 2, space.dtype)
    valid = valid * xp.ones(stats.shape, dtype=space.dtype, device=space.device)
    n_valid = xp.sum(valid)
    if not bool(n_valid > 0):
        raise InsufficientSamplesError(
            "stats: every dimension has fewer than 2 gradient samples, so the variance is "
            "unidentifiable; use per-example or micro-batch samples (samples='per_example' or "
            "'microbatch'), accumulate statistics across steps (samples='steps'), or give "
            "NormalGammaPrior(beta0=...) explicitly"
        )
    v = stats.variance * valid
    vbar = xp.sum(v) / n_valid
    if not bool(xp.isfinite(vbar)):
        # The sum over D overflows the dtype although every term is finite
        # (float32 M2 ~ 1e33 over 1e5 dimensions): average terms scaled first.
        vbar = xp.sum(v / n_valid)
    return alpha0 * vbar


def posterior(stats: GradientStats, prior: NormalGammaPrior | None = None) -> Posterior:
    """Conjugate Normal-Gamma update of ``prior`` with ``stats`` (equations above).

    Shapes: ``stats.mean`` is ``(*shape)``; the returned ``mu`` and ``beta`` are
    ``(*shape)``, ``kappa`` and ``alpha`` broadcast to it.
    """
    prior = NormalGammaPrior() if prior is None else prior
    if not isinstance(stats, GradientStats):
        raise ConfigError(f"stats: expected GradientStats, got {type(stats).__name__}")
    n, m, m2 = stats.count, stats.mean, stats.m2
    beta0 = empirical_beta0(stats, prior.alpha0) if prior.beta0 is None else prior.beta0
    kappa = prior.kappa0 + n
    alpha = prior.alpha0 + 0.5 * n
    if prior.kappa0 == 0:
        # mu_n = m exactly; avoids 0/0 where n == 0.
        mu = m
        beta = beta0 + 0.5 * m2
    else:
        d = m - prior.mu0
        mu = (prior.kappa0 * prior.mu0 + n * m) / kappa
        beta = beta0 + 0.5 * m2 + (prior.kappa0 * n / (2.0 * kappa)) * (d * d)
    return Posterior(mu=mu, kappa=kappa, alpha=alpha, beta=beta)
