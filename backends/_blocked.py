"""The fused calibration pipeline, written once over a tiny set of ``out=`` operations.

The NumPy and PyTorch fast paths run this same algorithm with their own
:class:`Ops` (in-place ufuncs / ``torch.*(..., out=)``). It computes exactly
the quantities of :func:`bogc_core.calibrate.reference_calibrate` for one
group of ``D`` dimensions and ``S`` sources, but walks the flattened
statistics in cache-sized blocks so that every intermediate lives in a small
preallocated workspace instead of a fresh ``(S, D)`` temporary.

Passes (each a sequential walk over the group; the data of one block stays in
cache between the operations applied to it):

A. (empirical-Bayes prior only) ``sum_d M2_kd`` per source (one read of every
   ``M2``): gives ``vbar_k`` and the zero-variance test ``any(M2_k > 0)``.
B. Log scores: reads ``m``, ``M2`` (and per-dimension counts), writes the
   varying part ``y_kd`` of ``l_kd = C_k + mult * y_kd`` (see
   :func:`_log_score_block`) into the evidence output buffer and sums its
   finite entries, which gives ``ref``.
C. Per dimension: ``e = exp(clip(gamma * (l - ref)))`` in place (one affine
   map of ``y``), fused belief and
   uncertainty, weights, and ``g' = sum_k w_k lambda_k mu_k``; reads ``y``
   and ``m``, writes ``e, w, U, B, g'`` (``B`` into the belief-scale buffer,
   ``g'`` into the gradient buffer) and sums ``B``.
D. ``s = B / mean(B)`` (clipped at ``s_max``) and ``g = s * S * g'``, over
   the two ``D``-sized buffers only.

Each pass needs the group reduction of the one before (``vbar`` -> ``beta``
-> ``ref``; ``ref`` -> ``e`` -> ``B``; ``mean(B)`` -> ``s``), so three
sequential walks over the statistics plus one over ``D``-sized outputs is
the least any exact implementation can do; pass A disappears with an
explicit ``beta0``.

Fused belief without transcendentals: with ``x_k = e_k / W`` the fused
uncertainty is ``U = 1 / prod_k (1 + x_k)``. ``Q = prod_k(1 + x_k) - 1`` is
accumulated as ``Q <- Q + x + Q*x`` (only positive terms, so no cancellation
and full relative precision for small ``Q``), then ``U = 1/(1+Q)`` and
``B = 1 - U = Q * U``. This equals the reference's
``-expm1(-sum_k log1p(x_k))`` to a few ulps and saves ``S`` log1p and two
exp calls per dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bogc_core._types import Calibration, CalibrationConfig, Decline

from ._gradient import gauss_legendre01

__all__ = ["Ops", "run_blocked", "evidence_range_problem", "decline_reason", "hugepage_buffer"]


class Ops:
    """Elementwise primitives with an explicit output (which may alias an input).

    ``a``/``b`` operands are arrays of the block's length or Python floats.
    Subclasses implement them with one library call each.
    """

    xp: Any

    # -- allocation and bookkeeping
    def empty(self, shape: tuple[int, ...]) -> Any: ...
    def empty_output(self, shape: tuple[int, ...]) -> Any:
        """An array returned to the caller (may use a faster allocation than ``empty``)."""
        return self.empty(shape)

    def flat(self, x: Any) -> Any:
        raise NotImplementedError

    def flat_count(self, count: Any, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def numel(self, x: Any) -> int:
        raise NotImplementedError

    def item(self, x: Any) -> float:
        raise NotImplementedError

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError


    def zero_acc(self) -> Any:
        return 0.0

    def acc_sum(self, acc: Any, x: Any) -> Any:
        """``acc + sum(x)``; the CPU backends return a Python float."""
        raise NotImplementedError

    def to_float(self, acc: Any) -> float:
        return float(acc)

    def min_float(self, x: Any) -> float:
        """``min(x)`` as a Python float."""
        raise NotImplementedError

    def sum_float(self, x: Any) -> float:
        """``sum(x)`` as a Python float."""
        raise NotImplementedError

    def finite_sum(self, x: Any) -> tuple[float, float]:
        """Sum and number of the finite entries of ``x``."""
        raise NotImplementedError

    def count_zero(self, x: Any) -> int:
        """Number of zero entries of ``x``."""
        raise NotImplementedError

    def count_not_normal(self, x: Any, tiny: float) -> int:
        """Number of entries of ``x >= 0`` below ``tiny`` or infinite."""
        raise NotImplementedError

    # -- elementwise, into ``out``
    def copy(self, x: Any, out: Any) -> Any: ...
    def fill(self, out: Any, value: float) -> Any: ...
    def add(self, a: Any, b: Any, out: Any) -> Any: ...
    def mul(self, a: Any, b: Any, out: Any) -> Any: ...
    def div(self, a: Any, b: Any, out: Any) -> Any: ...
    def rdiv(self, a: float, b: Any, out: Any) -> Any: ...
    def addcmul(self, acc: Any, a: Any, b: Any, value: float, tmp: Any) -> Any:
        """``acc += value * a * b`` (``tmp`` is scratch that may be overwritten)."""

    def axpy(self, acc: Any, x: Any, alpha: float, tmp: Any) -> Any:
        """``acc += alpha * x`` (``tmp`` is scratch, possibly ``x`` itself)."""

    def affine(self, x: Any, scale: float, shift: float, out: Any) -> Any:
        """``out = scale * x + shift``."""

    def clamp(self, x: Any, lo: float | None, hi: float | None, out: Any) -> Any: ...
    def abs(self, x: Any, out: Any) -> Any: ...
    def sqrt(self, x: Any, out: Any) -> Any: ...
    def recip(self, x: Any, out: Any) -> Any: ...
    def log(self, x: Any, out: Any) -> Any: ...
    def exp(self, x: Any, out: Any) -> Any: ...
    def ge(self, x: Any, value: float, out: Any) -> Any: ...


def evidence_range_problem(config: CalibrationConfig, tiny: float, big: float) -> str | None:
    """Why the fused fusion arithmetic cannot represent this config's evidence, or None.

    ``e`` lies in ``[exp(-clip), exp(clip)]``; the fused belief divides it by
    ``W`` and multiplies across sources, which needs ``e/W`` to stay a
    positive finite number of the dtype. (The reference itself yields
    infinite evidence or NaN weights beyond this range.)
    """
    L, W = float(config.clip), float(config.prior_weight)
    try:
        hi = math.exp(L)
        lo = math.exp(-L)
    except OverflowError:
        return f"clip={L} makes exp(clip) overflow"
    if not (hi < big and hi / W < big and lo / W >= tiny and lo >= tiny):
        return (
            f"clip={L} with prior_weight={W} puts evidence/prior_weight outside the dtype's "
            f"normal range"
        )
    return None


_HUGE_MIN_BYTES = 4 << 20


def hugepage_buffer(nbytes: int) -> Any | None:
    """Anonymous memory advised for transparent huge pages, or None where unsupported.

    A fresh output is written once; with 4 KiB pages the first touch of each
    page costs a kernel fault that, for the ``(2S + 3) * D`` outputs of a
    call, can take longer than the computation. 2 MiB pages cut the number
    of faults 512-fold. The mapping is released when the last array viewing
    it is garbage collected.
    """
    import mmap

    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < _HUGE_MIN_BYTES or advice is None:
        return None
    try:
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(advice)
    except (OSError, ValueError, AttributeError):
        return None
    return mm


@dataclass
class _Source:
    mean: Any
    m2: Any
    n: Any  # Python float (one count for every dimension) or flat per-dimension counts
    beta0: float
    lam: float


def _prepare(ops: Ops, stats: Sequence[Any], lambdas: Sequence[float], shape: tuple[int, ...]):
    out = []
    for s, lam in zip(stats, lambdas, strict=False):
        if ops.numel(s.count) == 1:
            n: Any = ops.item(s.count)
        else:
            n = ops.flat_count(s.count, shape)
        out.append(_Source(ops.flat(s.mean), ops.flat(s.m2), n, 0.0, float(lam)))
    return out


def decline_reason(
    space: Any, stats: Sequence[Any], config: CalibrationConfig | None
) -> str | None:
    """Why no fused path can take this call (the reference runs instead), or None.

    Shared by every backend: a dtype other than float32/float64, statistics
    that require grad (the fused paths write into buffers, outside autograd),
    an empty parameter, or (with a ``config``) evidence the dtype cannot represent.
    """
    dtype_name = str(space.dtype).rsplit(".", 1)[-1]
    if dtype_name not in ("float32", "float64"):
        return f"dtype {space.dtype} (the fused paths support float32 and float64)"
    for s in stats:
        if any(getattr(t, "requires_grad", False) for t in (s.count, s.mean, s.m2)):
            return "statistics require grad (the fused path writes into buffers, outside autograd)"
    if math.prod(stats[0].shape) == 0:
        return "empty parameter (no dimensions)"
    if config is None:
        return None
    return evidence_range_problem(config, space.tiny, space.max)


def run_blocked(
    ops: Ops,
    path: str,
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
    block: int,
) -> Calibration:
    """The fused pipeline on validated inputs; a ``str`` is a reason to decline."""
    problem = decline_reason(space, stats, config)
    if problem:
        raise Decline(problem)
    shape = tuple(stats[0].shape)
    D = math.prod(shape)
    S = len(stats)
    tiny, big = space.tiny, space.max
    prior = config.prior
    gamma, L, W = float(config.gamma), float(config.clip), float(config.prior_weight)
    srcs = _prepare(ops, stats, lambdas, shape)
    per_dim = any(not isinstance(s.n, float) for s in srcs)
    C = max(1, min(block, D))
    n_ws = 3 + (2 if per_dim else 0)
    ws = ops.empty((n_ws, C))
    blocks = [(a, min(D, a + C)) for a in range(0, D, C)]

    # ---- pass A: empirical-Bayes beta0 and the zero-variance test
    zero_var: list[str] = []
    for name, src in zip(names, srcs, strict=False):
        if prior.beta0 is not None:
            src.beta0 = float(prior.beta0)
            continue
        if isinstance(src.n, float):
            if not src.n >= 2:
                raise Decline("fewer than 2 samples in every dimension (the reference raises)")
            total = ops.to_float(ops.acc_sum(ops.zero_acc(), src.m2))
            if not math.isfinite(total):
                total = _scaled_total(ops, lambda a, b, m2=src.m2: m2[a:b], blocks, ws[0])
            vbar = total / src.n / D
            any_var = total > 0
        else:
            acc_v, acc_n, acc_m2 = ops.zero_acc(), ops.zero_acc(), ops.zero_acc()
            for a, b in blocks:
                n = src.n[a:b]
                mask, var = ws[0, : b - a], ws[1, : b - a]
                ops.ge(n, 2.0, out=mask)
                # max(n, 2) equals n wherever the mask keeps the term, and
                # keeps masked-out terms finite (0 * inf would be NaN).
                ops.clamp(n, 2.0, None, out=var)
                ops.div(src.m2[a:b], var, out=var)
                ops.mul(var, mask, out=var)
                acc_v = ops.acc_sum(acc_v, var)
                acc_n = ops.acc_sum(acc_n, mask)
                acc_m2 = ops.acc_sum(acc_m2, src.m2[a:b])
            n_valid = ops.to_float(acc_n)
            if not n_valid > 0:
                raise Decline("fewer than 2 samples in every dimension (the reference raises)")
            total_v = ops.to_float(acc_v)
            if not math.isfinite(total_v):
                # var (ws[1]) is recomputed per block into ws[1]; the scaled copy goes to ws[2].
                def var_of(a: int, b: int, src: Any = src) -> Any:
                    mask, var = ws[0, : b - a], ws[1, : b - a]
                    ops.ge(src.n[a:b], 2.0, out=mask)
                    ops.clamp(src.n[a:b], 2.0, None, out=var)
                    ops.div(src.m2[a:b], var, out=var)
                    return ops.mul(var, mask, out=var)

                total_v = _scaled_total(ops, var_of, blocks, ws[2])
            vbar = total_v / n_valid
            any_var = ops.to_float(acc_m2) > 0
        src.beta0 = float(prior.alpha0) * vbar
        if not any_var:
            zero_var.append(name)

    E = ops.empty_output((S, D))
    Wt = ops.empty_output((S, D))
    U = ops.empty_output((D,))
    Bs = ops.empty_output((D,))
    G = ops.empty_output((D,))

    # ---- pass B: the varying part y of every log score (into E), and ref
    if zero_var or gamma == 0.0:
        # Deterministic gradients: every dimension gets equal evidence
        # (docs/method.md, Stage 1); gamma = 0 maps every score to e = exp(0) = 1.
        ops.fill(E, 1.0)
        affine = []
    else:
        snr = config.evidence_from == "snr"
        mult = 2.0 if snr else -1.0  # l = C_k + mult * y
        consts = [_log_score_constant(src, prior, tiny) for src in srcs]
        total, count = 0.0, 0.0
        for k, src in enumerate(srcs):
            for a, b in blocks:
                y = E[k, a:b]
                t, c = _log_score_block(ops, src, a, b, ws, y, prior, snr, tiny)
                total += consts[k] * c + mult * t
                count += c
        # ref = mean of the finite scores (l = -inf, a zero mean under "snr",
        # takes no part; bogc_core.evidence.reference).
        ref = total / max(count, 1.0)
        # e = exp(clip(gamma * (l - ref))) with l = C_k + mult * y: one affine map.
        # A gamma so small that gamma*mult rounds to 0 in the dtype would turn
        # the -inf scores into NaN (0 * -inf); the smallest normal scale keeps
        # them at -inf (minimum evidence) and every finite score at ~0.
        scale = math.copysign(max(abs(gamma * mult), tiny), mult)
        affine = [(scale, gamma * (c - ref)) for c in consts]

    # ---- pass C: evidence, fusion, weights, unscaled gradient
    dws = ops.empty((3 * S + 2, C)) if (config.weights == "dempster" and S > 1) else None
    acc_b = ops.zero_acc()
    # Q = prod_k (1 + e_k/W) - 1 stays finite unless (1 + e^L/W)^S exceeds the dtype.
    q_may_overflow = S * math.log1p(math.exp(L) / W) >= math.log(big)
    for a, b in blocks:
        m = b - a
        t0 = ws[0, :m]
        e = [E[k, a:b] for k in range(S)]
        if not zero_var:
            for ek, (scale, shift) in zip(e, affine, strict=False):
                ops.affine(ek, scale, shift, out=ek)
                ops.clamp(ek, -L, L, out=ek)
                ops.exp(ek, out=ek)
        # Q is accumulated in the belief buffer and turned into B in place.
        Q = B = Bs[a:b]
        if W == 1.0:
            xs = e
        else:
            # x_k = e_k / W; W != 1 needs buffers for them (in the weights' rows,
            # which are written only later in this block).
            xs = [ops.div(ek, W, out=Wt[k, a:b]) for k, ek in enumerate(e)]
        if S == 1:
            ops.copy(xs[0], Q)
        else:
            ops.add(xs[0], xs[1], out=Q)  # Q = x0 + x1 + x0*x1
            ops.addcmul(Q, xs[0], xs[1], 1.0, tmp=t0)
            for x in xs[2:]:
                ops.addcmul(Q, Q, x, 1.0, tmp=t0)
                ops.add(Q, x, out=Q)
        if q_may_overflow:
            # Q = inf would give B = inf * 0; the largest finite Q gives B = 1, U ~ 0.
            ops.clamp(Q, None, big, out=Q)
        Uc = U[a:b]
        ops.add(Q, 1.0, out=Uc)
        ops.recip(Uc, out=Uc)  # U = 1 / (1 + Q)
        ops.mul(Q, Uc, out=B)  # B = Q / (1 + Q) = Q * U, in place of Q
        if config.scale == "belief":
            acc_b = ops.acc_sum(acc_b, B)
        w = [Wt[k, a:b] for k in range(S)]
        if config.weights == "evidence":
            tot = w[0]
            if S == 1:
                ops.copy(e[0], tot)
            else:
                ops.add(e[0], e[1], out=tot)
            for ek in e[2:]:
                ops.add(tot, ek, out=tot)
            for k in range(1, S):
                ops.div(e[k], tot, out=w[k])
            ops.div(e[0], tot, out=w[0])
        elif config.weights == "uniform":
            for wk in w:
                ops.fill(wk, 1.0 / S)
        elif config.weights == "dempster":
            _dempster_block(ops, e, w, B, W, dws, m)
        g = G[a:b]
        for k, src in enumerate(srcs):
            mu = _mu(ops, src, a, b, ws, prior)
            if k == 0:
                ops.mul(w[0], mu, out=g)
                if src.lam != 1.0:
                    ops.mul(g, src.lam, out=g)
            else:
                ops.addcmul(g, w[k], mu, src.lam, tmp=ws[1, :m])

    # ---- pass D: belief scale and the calibrated gradient
    if config.scale == "belief":
        mean_b = ops.to_float(acc_b) / D
        for a, b in blocks:
            s, g = Bs[a:b], G[a:b]
            ops.div(s, mean_b, out=s)
            if config.s_max is not None:
                ops.clamp(s, None, float(config.s_max), out=s)
            ops.mul(g, float(S), out=g)
            ops.mul(g, s, out=g)
    else:
        ops.fill(Bs, 1.0)
        ops.mul(G, float(S), out=G)

    flags = {"path": path, "zero_variance_sources": zero_var}
    return Calibration(
        ops.reshape(G, shape),
        ops.reshape(Wt, (S,) + shape),
        ops.reshape(U, shape),
        ops.reshape(Bs, shape),
        ops.reshape(E, (S,) + shape),
        names,
        W,
        flags,
    )


def _scaled_total(ops: Ops, get: Any, blocks: Sequence[tuple[int, int]], tmp: Any) -> float:
    """``sum(x)`` over the blocks (``get(a, b)`` is ``x[a:b]``) where a sum in the dtype
    overflowed although every term is finite: each block is summed scaled by a power
    of two ``2^-k <= 1/len``, so no partial sum exceeds the largest term, and the
    block sums are added in float64 (docs/reliability.md)."""
    total = 0.0
    for a, b in blocks:
        k = max(1, (b - a - 1).bit_length())
        t = ops.mul(get(a, b), 2.0**-k, out=tmp[: b - a])
        total += ops.to_float(ops.acc_sum(ops.zero_acc(), t)) * 2.0**k
    return total


def _mu(ops: Ops, src: _Source, a: int, b: int, ws: Any, prior: Any) -> Any:
    """Posterior mean ``mu_n`` of a block (a view of ``m`` when ``kappa0 == 0``)."""
    m = src.mean[a:b]
    if prior.kappa0 == 0:
        return m
    k0, mu0 = float(prior.kappa0), float(prior.mu0)
    mu = ws[2, : b - a]
    if isinstance(src.n, float):
        kappa = k0 + src.n
        ops.mul(m, src.n, out=mu)
        ops.add(mu, k0 * mu0, out=mu)
        ops.div(mu, kappa, out=mu)
    else:
        n, kap = src.n[a:b], ws[3, : b - a]
        ops.add(n, k0, out=kap)
        ops.mul(n, m, out=mu)
        ops.add(mu, k0 * mu0, out=mu)
        ops.div(mu, kap, out=mu)
    return mu


def _log_score_constant(src: _Source, prior: Any, tiny: float) -> float:
    """``C_k`` with ``l = C_k + mult * y`` (see :func:`_log_score_block`)."""
    c = math.log(2.0)
    if isinstance(src.n, float):
        c += math.log(max(prior.alpha0 + 0.5 * src.n, tiny))
        c += math.log(max(prior.kappa0 + src.n, tiny))
    return c


def _log_score_block(
    ops: Ops,
    src: _Source,
    a: int,
    b: int,
    ws: Any,
    y: Any,
    prior: Any,
    snr: bool,
    tiny: float,
) -> tuple[float, float]:
    """Write the varying part ``y`` of one block's log scores; return (sum, count) of the finite ones.

    docs/method.md Stages 1-2 as in the core: ``l = log(alpha) +
    log(kappa) - log(beta) [+ 2 log|mu|]`` with ``alpha, kappa, beta`` floored
    at ``tiny`` and ``l = -inf`` where ``mu = 0`` (``snr``). With
    ``b = 2*beta = M2 + 2*beta0 [+ kappa0*n*(m - mu0)^2/kappa]`` the fast form
    takes one log per element: ``y = log(|mu| / sqrt(b))`` (``snr``,
    ``l = C_k + 2y``) or ``y = log(b)`` (``precision``, ``l = C_k - y``),
    ``C_k = log 2 + log(alpha) + log(kappa)`` (count-dependent logs go into
    ``y`` when the count varies per dimension). Where the quotient is not a
    normal number (an extreme ratio, but not a zero mean, whose ``log 0 = -inf``
    is its score) the block is redone with separate logs of each factor,
    exactly as the reference takes them.
    """
    m = b - a
    if _fast_block(ops, src, a, b, ws, y, prior, snr, tiny):
        total = ops.sum_float(y)
        if math.isfinite(total):
            return total, float(m)
        # -inf scores of zero means: summed without them, nothing recomputed.
        return ops.finite_sum(y)
    _safe_block(ops, src, a, b, ws, y, prior, snr, tiny)
    return ops.finite_sum(y)


def _beta_times(
    ops: Ops, src: _Source, a: int, b: int, ws: Any, prior: Any, f: float, tiny: float
) -> Any:
    """``f * beta`` of a block into ``ws[0]``; ``beta`` of docs/method.md Stage 1."""
    m = b - a
    bb = ws[0, :m]
    if f == 1.0:
        ops.mul(src.m2[a:b], 0.5, out=bb)
        ops.add(bb, src.beta0, out=bb)
    else:
        ops.add(src.m2[a:b], 2.0 * src.beta0, out=bb)
    if prior.kappa0 != 0:
        k0, mu0 = float(prior.kappa0), float(prior.mu0)
        d = ws[1, :m]
        ops.add(src.mean[a:b], -mu0, out=d)
        ops.mul(d, d, out=d)
        if isinstance(src.n, float):
            ops.axpy(bb, d, 0.5 * f * k0 * src.n / (k0 + src.n), tmp=d)
        else:
            kap = ws[3, :m]  # kappa0 + n, left there by _mu
            ops.mul(d, src.n[a:b], out=d)
            ops.div(d, kap, out=d)
            ops.axpy(bb, d, 0.5 * f * k0, tmp=d)
    if not src.beta0 >= tiny:
        # Otherwise bb >= f * beta0 >= the floor already.
        ops.clamp(bb, f * tiny, None, out=bb)
    return bb


def _fast_block(ops, src, a, b, ws, y, prior, snr, tiny) -> bool:
    mu = _mu(ops, src, a, b, ws, prior)
    bb = _beta_times(ops, src, a, b, ws, prior, 2.0, tiny)
    if snr:
        ops.sqrt(bb, out=bb)
        ops.abs(mu, out=y)
        zeros = ops.count_zero(y)
        ops.div(y, bb, out=y)
        # A zero mean gives 0 and then log 0 = -inf, which is its score; only a
        # nonzero ratio that is not a normal number (extreme magnitudes) needs
        # the separate logs of the safe form.
        if ops.count_not_normal(y, tiny) != zeros:
            return False
        ops.log(y, out=y)
    else:
        ops.log(bb, out=y)
    _add_count_logs(ops, src, a, b, ws, y, prior, 1.0 if snr else -1.0, 0.5 if snr else 1.0, tiny)
    return True


def _safe_block(ops, src, a, b, ws, y, prior, snr, tiny) -> None:
    """``y`` as the reference computes it: separate logs, ``-inf`` where ``mu = 0``."""
    m = b - a
    mu = _mu(ops, src, a, b, ws, prior)
    bb = _beta_times(ops, src, a, b, ws, prior, 1.0, tiny)
    ops.log(bb, out=y)  # log(beta)
    if snr:
        t = ws[1, :m]
        ops.abs(mu, out=t)
        ops.log(t, out=t)  # -inf where mu == 0, as in the reference
        ops.mul(y, -0.5, out=y)
        ops.add(y, t, out=y)  # log|mu| - log(beta)/2 = (l - C_k)/2 + log(2)/2
        ops.add(y, -0.5 * math.log(2.0), out=y)
    else:
        ops.add(y, math.log(2.0), out=y)  # log(2*beta) = C_k - l
    _add_count_logs(ops, src, a, b, ws, y, prior, 1.0 if snr else -1.0, 0.5 if snr else 1.0, tiny)


def _add_count_logs(ops, src, a, b, ws, y, prior, sgn, f, tiny) -> None:
    """Per-dimension counts: ``y += sgn * f * (log(alpha) + log(kappa))``."""
    if isinstance(src.n, float):
        return
    m = b - a
    n, t = src.n[a:b], ws[4, :m]
    ops.mul(n, 0.5, out=t)
    ops.add(t, float(prior.alpha0), out=t)
    ops.clamp(t, tiny, None, out=t)
    ops.log(t, out=t)
    ops.axpy(y, t, sgn * f, tmp=t)
    ops.add(n, float(prior.kappa0), out=t)
    ops.clamp(t, tiny, None, out=t)
    ops.log(t, out=t)
    ops.axpy(y, t, sgn * f, tmp=t)


def _dempster_block(ops: Ops, e: list, w: list, B: Any, W: float, dws: Any, m: int) -> None:
    """Dempster shares of one block (``bogc_core.weights``: Gauss-Legendre, exact)."""
    S = len(e)
    if S == 1:
        ops.fill(w[0], 1.0)
        return
    bb = [dws[k, :m] for k in range(S)]
    uu = [dws[S + k, :m] for k in range(S)]
    F = [dws[2 * S + k, :m] for k in range(S)]
    P, t = dws[3 * S, :m], dws[3 * S + 1, :m]
    for k in range(S):
        ops.add(e[k], W, out=t)
        ops.div(e[k], t, out=bb[k])
        ops.rdiv(W, t, out=uu[k])
        ops.fill(w[k], 0.0)
    nodes, gws = gauss_legendre01((S + 1) // 2)
    for node, gw in zip(nodes, gws, strict=False):
        for k in range(S):
            ops.mul(bb[k], node, out=F[k])
            ops.add(F[k], uu[k], out=F[k])
        ops.copy(F[0], P)
        for k in range(1, S):
            ops.mul(P, F[k], out=P)
        for k in range(S):
            ops.div(P, F[k], out=t)
            ops.axpy(w[k], t, gw, tmp=t)
    for k in range(S):
        ops.mul(w[k], bb[k], out=w[k])
        ops.div(w[k], B, out=w[k])
