"""Stage 2: evidence by power mapping, in the log domain (docs/method.md#evidence).

Per source ``k`` and dimension ``d`` a log reliability score::

    l_kd = log(tau_kd) + 2*log|mu_kd|   (evidence_from="snr";   -inf where mu_kd == 0)
    l_kd = log(tau_kd)                  (evidence_from="precision")

is compared with a reference shared by all sources of the group,
``ref = mean of the finite l_kd``, and mapped to evidence
``e_kd = exp(clip(gamma * (l_kd - ref), -L, L))``: this is
``(q / q_ref)^gamma`` with ``q_ref`` the geometric mean of the positive ``q``.

Departure from the original statement of the method (docs/method.md#departures), which floors
``mu^2`` at the dtype's smallest normal number. That floor is an absolute
number, so a mean that is exactly 0 (a dead unit, an unused embedding row)
breaks scale equivariance (closed forms 7 and 10), and its ``l = log(tiny)``
(about -708 in float64) drags the geometric-mean reference of the whole group
down until every other dimension sits at the clip bound. Here ``q = 0``
gives ``l = -inf``: it takes no part in the reference and gets the minimum
evidence ``exp(-L)``, which is scale free and leaves the other dimensions
alone. For every ``q > 0`` the two definitions agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._namespace import Space, resolve
from ._posterior import Posterior
from ._types import DEFAULT_CLIP, EVIDENCE_FROM, Array
from .errors import ConfigError, ShapeError

__all__ = ["evidence"]

def log_score(post: Posterior, evidence_from: str = "snr") -> Array:
    """``l = log q`` of one source, shape ``(*shape)``; finite except ``-inf`` where ``q = 0``."""
    if evidence_from not in EVIDENCE_FROM:
        raise ConfigError(
            f"evidence_from: must be one of {EVIDENCE_FROM}, got {evidence_from!r}"
        )
    space = resolve(post.mu, names=("posterior.mu",))
    xp = space.xp
    l = post.log_precision()
    if evidence_from == "snr":
        # 2*log|mu| rather than log(mu^2): mu^2 over- or underflows in float32.
        # q = 0 maps to l = -inf on purpose (module docstring), without
        # evaluating log(0), which warns in NumPy.
        a = xp.abs(post.mu)
        zero = a == 0
        log_a = xp.log(xp.where(zero, xp.ones_like(a), a))
        l = xp.where(zero, xp.full_like(a, -math.inf), l + 2.0 * log_a)
    # kappa and alpha may be 0-d; give every score the parameter's shape.
    return xp.broadcast_to(l, tuple(post.mu.shape))


def _check_gamma_clip(gamma: float, clip: float) -> None:
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ConfigError(f"gamma: must be a finite number >= 0 (0.5 is the default), got {gamma!r}")
    if not (isinstance(clip, (int, float)) and clip > 0):
        raise ConfigError(f"clip: must be > 0 (log(1e6) is the default), got {clip!r}")


def largest_clip(space: Space, prior_weight: float = 1.0, S: int = 1) -> float:
    """Largest ``clip`` whose evidence range stays finite and normal in ``space``'s dtype.

    Evidence lies in ``[exp(-clip), exp(clip)]``; the pipeline needs
    ``exp(-clip)`` and ``exp(-clip)/W`` at least the smallest normal number
    (else a dimension with zero mean in every source gets zero evidence
    everywhere and 0/0 weights), and ``S * exp(clip)`` and ``S * exp(clip)/W``
    at most the largest number (the sums over sources), each with a margin of
    a factor ``e``: about 86.3 in float32 and 707.4 in float64 for ``W = 1``
    and two sources. ``<= 0`` means no clip
    works: ``prior_weight`` itself is out of range.
    """
    log_tiny, log_big = math.log(space.tiny), math.log(space.max)
    log_w = math.log(prior_weight)
    # A margin of a factor e on both ends: exp() is a few ulps off, and
    # libraries that flush subnormals to zero (XLA on CPU) turn a result just
    # below the smallest normal number into 0.
    margin = 1.0
    return min(-log_tiny - max(0.0, log_w), log_big - math.log(S) + min(0.0, log_w)) - margin


def check_evidence_range(space: Space, clip: float, prior_weight: float = 1.0, S: int = 1) -> None:
    """Raise :class:`ConfigError` when ``clip`` (or ``prior_weight``) puts evidence
    outside what ``space``'s dtype represents; see :func:`largest_clip`."""
    limit = largest_clip(space, prior_weight, S)
    dtype = str(space.dtype).rsplit(".", 1)[-1]
    if limit <= 0:
        raise ConfigError(
            f"prior_weight: {prior_weight} is outside the range {dtype} can use with {S} "
            f"sources (between about {S / space.max:.3g} and {1 / space.tiny:.3g}); use a "
            f"prior_weight near 1 (the default), or float64"
        )
    if not clip <= limit:
        raise ConfigError(
            f"clip: {clip} is too large for {dtype} with prior_weight={prior_weight} and {S} "
            f"sources: exp(-clip) or exp(clip) leaves the dtype's range, so a dimension whose "
            f"mean is 0 in every source would get NaN; use clip <= {limit:.6g} (log(1e6) is "
            f"the default)"
        )


def evidence_from_log_scores(l: Array, gamma: float = 0.5, clip: float = DEFAULT_CLIP) -> Array:
    """``e = exp(clip(gamma * (l - ref), -clip, clip))`` for stacked scores ``l[S, *shape]``.

    ``ref`` is the mean of the finite entries of ``l`` (0 if there are none);
    entries at ``-inf`` (zero reliability) get the minimum evidence ``exp(-clip)``.
    Raises :class:`ConfigError` for a ``clip`` beyond :func:`largest_clip` or a
    ``gamma`` beyond the dtype's largest number.
    """
    _check_gamma_clip(gamma, clip)
    space = resolve(l, names=("scores",))
    xp = space.xp
    check_evidence_range(space, clip, 1.0, int(l.shape[0]) if len(l.shape) else 1)
    if gamma > space.max:
        raise ConfigError(f"gamma: {gamma} exceeds the dtype's largest number; use gamma <= {space.max:.4g}")
    ref = reference(l)
    if gamma == 0:  # q^0 = 1 everywhere, including q = 0
        return xp.ones_like(l)
    # l = -inf is set directly: a gamma that underflows to 0 in float32 would
    # otherwise give 0 * inf = NaN.
    finite = xp.isfinite(l)
    z = xp.where(finite, gamma * (xp.where(finite, l, ref) - ref), xp.full_like(l, -clip))
    return xp.exp(xp.clip(z, min=-clip, max=clip))


def reference(l: Array) -> Array:
    """Mean of the finite entries of ``l`` (0-d array; 0 when no entry is finite)."""
    xp = resolve(l, names=("scores",)).xp
    finite = xp.isfinite(l)
    count = xp.sum(xp.astype(finite, l.dtype))
    total = xp.sum(xp.where(finite, l, xp.zeros_like(l)))
    return total / xp.clip(count, min=1.0)


def evidence(
    posteriors: Sequence[Posterior],
    gamma: float = 0.5,
    evidence_from: str = "snr",
    clip: float = DEFAULT_CLIP,
) -> Array:
    """Evidence of every source, stacked on a new leading axis: shape ``(S, *shape)``.

    ``posteriors`` is a non-empty sequence over sources, all of one shape; the
    reference ``ref`` is shared by all of them, so relative reliability
    between sources survives the power map.
    """
    _check_gamma_clip(gamma, clip)
    posteriors = list(posteriors)
    if not posteriors:
        raise ShapeError("posteriors: empty; pass one Posterior per source")
    shape = tuple(posteriors[0].mu.shape)
    for k, p in enumerate(posteriors):
        if tuple(p.mu.shape) != shape:
            raise ShapeError(
                f"posteriors[{k}]: shape {tuple(p.mu.shape)} differs from {shape}; all sources "
                f"of a group must describe the same parameter"
            )
    names = tuple(f"posteriors[{k}].mu" for k in range(len(posteriors)))
    xp = resolve(*[p.mu for p in posteriors], names=names).xp
    l = xp.stack([log_score(p, evidence_from) for p in posteriors], axis=0)
    return evidence_from_log_scores(l, gamma, clip)
