"""Stages 3 and 4: subjective-logic opinions and reduced Dempster-Shafer fusion.

An opinion over ``K`` singletons holds a belief mass per singleton,
``belief[..., K]``, and the uncertainty mass on the whole frame,
``uncertainty[...]``, with ``sum(belief) + uncertainty = 1``. Two opinions
combine by the reduced Dempster rule (docs/method.md#fusion)::

    C   = sum_{i != j} b1_i * b2_j
    b_j = (b1_j*b2_j + b1_j*u2 + b2_j*u1) / (1 - C)
    u   = u1*u2 / (1 - C)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._namespace import resolve
from ._types import Array
from .errors import ConfigError, ShapeError, TotalConflictError

__all__ = ["Opinion", "reduced_dempster", "combine", "fuse_single"]


@dataclass(frozen=True, eq=False)
class Opinion:
    """Opinion with ``belief[..., K]`` and ``uncertainty[...]``."""

    belief: Array
    uncertainty: Array

    def __post_init__(self) -> None:
        resolve(self.belief, self.uncertainty, names=("belief", "uncertainty"))
        if len(self.belief.shape) < 1 or tuple(self.belief.shape[:-1]) != tuple(
            self.uncertainty.shape
        ):
            raise ShapeError(
                f"belief: shape {tuple(self.belief.shape)} must be uncertainty's shape "
                f"{tuple(self.uncertainty.shape)} plus a trailing axis of K singletons"
            )

    @property
    def K(self) -> int:
        return int(self.belief.shape[-1])

    @classmethod
    def from_evidence(cls, e: Array, prior_weight: float = 1.0) -> Opinion:
        """K = 1 opinion from evidence ``e[...]``: ``b = e/(e+W)``, ``u = W/(e+W)``."""
        if not prior_weight > 0:
            raise ConfigError(f"prior_weight: must be > 0 (1 is the default), got {prior_weight}")
        xp = resolve(e, names=("e",)).xp
        denom = e + prior_weight
        return cls(xp.expand_dims(e / denom, axis=-1), prior_weight / denom)

    @classmethod
    def vacuous(cls, shape: tuple[int, ...] | int, K: int = 1, like: Array = None) -> Opinion:
        """The identity of the fusion: ``b = 0``, ``u = 1``, in ``like``'s namespace/dtype/device."""
        if like is None:
            raise ConfigError("like: pass an array whose namespace, dtype and device to use")
        space = resolve(like, names=("like",))
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if K < 1:
            raise ConfigError(f"K: must be >= 1, got {K}")
        return cls(space.full(shape + (K,), 0.0), space.full(shape, 1.0))

    def evidence(self, prior_weight: float = 1.0) -> Array:
        """Evidence per singleton implied by the opinion, ``W * b / u``."""
        xp = resolve(self.belief).xp
        return prior_weight * self.belief / xp.expand_dims(self.uncertainty, axis=-1)


def _default_tol(xp: Any, dtype: Any) -> float:
    return 64.0 * float(xp.finfo(dtype).eps)


def reduced_dempster(a: Opinion, b: Opinion, tol: float | None = None) -> tuple[Opinion, Array]:
    """Combine two opinions over the same ``K`` singletons; returns ``(opinion, conflict)``.

    ``conflict`` has the shape of the uncertainty. Raises
    :class:`TotalConflictError` where ``1 - C <= tol`` (default ``64 * eps``).
    """
    space = resolve(a.belief, b.belief, names=("a.belief", "b.belief"))
    xp = space.xp
    if tuple(a.belief.shape) != tuple(b.belief.shape):
        raise ShapeError(
            f"b: belief shape {tuple(b.belief.shape)} differs from a's {tuple(a.belief.shape)}; "
            f"combine opinions over the same frame and dimensions"
        )
    b1, b2, u1, u2 = a.belief, b.belief, a.uncertainty, b.uncertainty
    # sum_{i != j} b1_i b2_j = (sum b1)(sum b2) - sum_i b1_i b2_i; exactly 0 for K = 1.
    agree = b1 * b2
    conflict = xp.clip(xp.sum(b1, axis=-1) * xp.sum(b2, axis=-1) - xp.sum(agree, axis=-1), min=0.0)
    norm = 1.0 - conflict
    if tol is None:
        tol = _default_tol(xp, space.dtype)
    elif isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ConfigError(
            f"tol: must be None (64 * eps) or a number in [0, 1), got {tol!r}"
        )
    if bool(xp.any(norm <= tol)):
        raise TotalConflictError(
            "a, b: the opinions are in total conflict (1 - C is at or near 0), so Dempster's "
            "rule is undefined; add uncertainty mass (a larger prior_weight) or lower gamma"
        )
    u1e, u2e = xp.expand_dims(u1, axis=-1), xp.expand_dims(u2, axis=-1)
    normx = xp.expand_dims(norm, axis=-1)
    belief = (agree + b1 * u2e + b2 * u1e) / normx
    return Opinion(belief, u1 * u2 / norm), conflict


def combine(opinions: Sequence[Opinion], tol: float | None = None) -> tuple[Opinion, Array]:
    """Fold :func:`reduced_dempster` over ``opinions`` (commutative and associative).

    Returns the fused opinion and the total conflict ``1 - prod_i (1 - C_i)``,
    which is the conflict of the one-shot combination of all opinions.
    """
    opinions = list(opinions)
    if not opinions:
        raise ShapeError("opinions: empty; pass at least one Opinion")
    for k, op in enumerate(opinions):
        if not isinstance(op, Opinion):
            raise ShapeError(
                f"opinions[{k}]: expected Opinion, got {type(op).__name__}; build one with "
                f"Opinion(belief, uncertainty) or Opinion.from_evidence"
            )
    fused = opinions[0]
    xp = resolve(fused.belief).xp
    keep = xp.ones_like(fused.uncertainty)
    for op in opinions[1:]:
        fused, c = reduced_dempster(fused, op, tol=tol)
        keep = keep * (1.0 - c)
    return fused, 1.0 - keep


def belief_bound(e: float, W: float, S: int) -> float:
    """Scalar fused belief ``B = 1 - (1 + e/W)^-S`` when every source has evidence ``e``."""
    x = e / W
    if x == math.inf:
        return 1.0
    q = math.expm1(S * math.log1p(x)) if S * math.log1p(x) < 700 else math.inf
    return 1.0 if q == math.inf else q / (1.0 + q)


def fuse_beliefs(e: Array, prior_weight: float = 1.0) -> tuple[Array, Array]:
    """K = 1 fusion of stacked evidence ``e[S, *shape]`` (no checks): ``(B, U)``.

    ``U = prod_k W/(e_k + W)`` and ``B = 1 - U``, computed as
    ``B = -expm1(-sum_k log1p(e_k / W))`` so a small fused belief keeps its
    relative precision.
    """
    xp = resolve(e, names=("e",)).xp
    log_u = -xp.sum(xp.log1p(e / prior_weight), axis=0)
    return -xp.expm1(log_u), xp.exp(log_u)


def fuse_single(e: Array, prior_weight: float = 1.0) -> tuple[Array, Array]:
    """Fast K = 1 fusion of stacked evidence ``e[S, *shape]``: ``(belief, uncertainty)``.

    As :func:`fuse_beliefs`, after checking that ``prior_weight`` is a finite
    number ``> 0`` and that ``e`` is finite and ``>= 0`` (evidence is a count
    of support; a negative one has no opinion).
    """
    if isinstance(prior_weight, bool) or not isinstance(prior_weight, (int, float)) or not (
        0 < prior_weight < math.inf
    ):
        raise ConfigError(f"prior_weight: must be a finite number > 0 (1 is the default), got {prior_weight!r}")
    space = resolve(e, names=("e",))
    xp = space.xp
    if math.prod(e.shape) > 0:
        lo, hi = xp.min(e), xp.max(e)
        if not bool(xp.isfinite(lo) & xp.isfinite(hi) & (lo >= 0)):
            raise ConfigError(
                "e: evidence must be finite and >= 0 (exp of a clipped log score); check how "
                "it was computed, or use bogc_core.evidence"
            )
    return fuse_beliefs(e, prior_weight)
