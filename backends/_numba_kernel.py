"""Compiled loops for the gradient-only path on the CPU (optional: needs ``numba``).

One compiled loop per pass of :mod:`._gradient` for its common case: float32
statistics, one count per source, ``kappa0 = 0``, ``2 gamma`` in
``{1/2, 1, 2, 4}``, evidence or uniform weights, belief scale without
``s_max`` (or no scale), and every scalar of the power form a normal float32
number (the engine's ``fast32`` conditions). Anything else, or a block of
statistics whose ratios ``r = |mu| / sqrt(beta)`` are not normal float32
numbers, returns ``False`` and the caller runs the array engine.

Passes, each walking the segments ``[starts[g], ends[g])`` inside compiled
code (``docs/method.md``, Stages 1-5):

A. ``sum M2`` per source and segment (float64): ``beta0 = alpha0 vbar``.
B. ``sum log r`` (``r = |m| / sqrt(beta)``, float32) over the non-zero means
   of each source and segment, without a log per element: each ratio is
   split by its bits into ``2^E f`` (``f`` in ``[1, 2)``), the exponents are
   summed as integers and the mantissas multiplied in float64, one log per
   ``_BL_B`` ratios. A zero mean gives ``r = 0`` and adds the factor
   ``r + 1 = 1`` (its score ``-inf`` takes no part in ``ref``); it is counted.
C. Per element: ``e = clip(|m| / (sqrt(beta) K^(-1/p)))^p`` (``p = 2 gamma``; a
   square root replaces the log and exp), ``Q = prod_k(1 + e_k/W) - 1``,
   ``B = Q/(1+Q)``, ``g' = sum_k e_k lambda_k m_k / sum_k e_k`` and
   ``out = c B g'``; ``sum B`` per segment (float64).
D. In place: ``out *= S / (c mean_g(B))``.

Float32 arithmetic as the reference's own; sums in float64. ``fastmath`` is
limited to ``nsz`` and ``contract`` (round-off only), with ``reassoc`` in the
pure sums and products: never ``nnan``/``ninf``/``arcp``, so infinities and
zeros stay exact and no reciprocal under- or overflows where a quotient
would not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bogc_core._types import CalibrationConfig

__all__ = ["AVAILABLE", "ENABLED", "gradient"]

numba: Any
try:
    import numba
except ImportError:  # the optional extra [fast] is not installed
    numba = None

AVAILABLE = numba is not None
# ENABLED[0]: whether callers try the compiled loops (tests switch it off to
# exercise the array engine on a machine with numba).
ENABLED = [AVAILABLE]

# Flags that change round-off only. Reassociation (which could regroup
# c * B * (num / den) into an overflow) is allowed only in the pure sums and
# products below, where it merely reorders the terms.
_FM = {"nsz", "contract"}
_FM_SUM = {"nsz", "contract", "reassoc"}
_POW_CODE = {0.5: 0, 1.0: 1, 2.0: 2, 4.0: 3}
# Elements per source processed in one step of pass C (three float32 scratch
# vectors of this length stay in L1).
_BL = 2048
# Ratios per log in pass B: a product of this many mantissas in [1, 2) stays
# below 2^1000.
_BL_B = 1000


def _jit(fn: Any, flags: set[str] = _FM) -> Any:
    if numba is None:
        return fn
    # error_model="numpy": a float division by zero gives inf/nan (no check
    # per element, which would also keep the loop from being vectorised).
    return numba.njit(cache=True, fastmath=flags, nogil=True, error_model="numpy")(fn)


def _sum64(x: Any) -> float:
    """Sum of a float32 vector in float64 (any order)."""
    acc = 0.0
    for j in range(x.shape[0]):
        acc += np.float64(x[j])
    return acc


def _prod64(x: Any) -> float:
    """Product of a float32 vector in float64 (any order)."""
    acc = 1.0
    for j in range(x.shape[0]):
        acc *= np.float64(x[j])
    return acc


_sum64_c = _jit(_sum64, _FM_SUM)
_prod64_c = _jit(_prod64, _FM_SUM)


def _m2_sums(m2: Any, starts: Any, ends: Any, out: Any) -> None:
    for g in range(starts.shape[0]):
        out[g] = _sum64_c(m2[starts[g] : ends[g]])


def _log_sums(
    m: Any, m2: Any, beta0: Any, tiny: Any, starts: Any, ends: Any, rb: Any, mb: Any,
    sums: Any, nzs: Any,
) -> int:
    """Per segment ``sum log r`` over non-zero means, and the number of zero means.

    ``rb``/``mb``: float32 scratch of length ``_BL_B``. A ratio ``r = 2^E f``
    (``f`` in ``[1, 2)``) is split by its bits: the exponents are summed as
    integers, the mantissas multiplied in float64 (a product of ``_BL_B``
    of them stays below ``2^1000``), one log per block. Returns the number of
    ratios that are not normal float32 numbers (the caller then takes the
    array engine's separate logs).
    """
    half = np.float32(0.5)
    zero = np.float32(0.0)
    ri = rb.view(np.int32)
    mi = mb.view(np.int32)
    bad = 0
    ln2 = math.log(2.0)
    for g in range(starts.shape[0]):
        nz = 0
        tot = 0.0
        a0 = starts[g]
        while a0 < ends[g]:
            n = min(rb.shape[0], ends[g] - a0)
            mm = m[a0 : a0 + n]
            vv = m2[a0 : a0 + n]
            b0 = beta0[g]
            for j in range(n):
                mv = mm[j]
                beta = max(vv[j] * half + b0, tiny)
                isz = mv == zero
                nz += isz
                # r = 0 exactly where the mean is zero: r + 1 is the factor 1.
                rb[j] = abs(mv) / np.sqrt(beta) + np.float32(isz)
            ex = 0
            nb = 0
            for j in range(n):
                bits = ri[j]
                ef = (bits >> 23) & 255
                nb += (ef == 0) | (ef == 255)
                ex += ef - 127
                mi[j] = (bits & 0x7FFFFF) | 0x3F800000
            pr = _prod64_c(mb[:n])
            bad += nb
            tot += math.log(pr) + ex * ln2
            a0 += n
        sums[g] = tot
        nzs[g] = nz
    return bad


def _evidence_out(
    ms: Any, m2s: Any, lams: Any, beta0: Any, invk: Any, eq: Any, starts: Any, ends: Any,
    tiny: Any, lo_t: Any, hi_t: Any, inv_w: Any, big: Any, pcode: int, snr: bool,
    uniform: bool, belief: bool, c_b: Any, n_src: Any, floor_beta: bool, out: Any,
    bsum: Any,
) -> None:
    """Pass C: ``out = c B g'`` (belief) or ``S g'``; ``bsum[g] = sum B``."""
    S = len(ms)
    half = np.float32(0.5)
    one = np.float32(1.0)
    tiny_b = tiny if floor_beta else np.float32(0.0)
    Q = np.empty(_BL, dtype=np.float32)
    num = np.empty(_BL, dtype=np.float32)
    den = np.empty(_BL, dtype=np.float32)
    E = np.empty(_BL, dtype=np.float32)
    for g in range(starts.shape[0]):
        eqv = eq[g]
        keep = one - eqv
        acc = 0.0
        a0 = starts[g]
        while a0 < ends[g]:
            n = min(_BL, ends[g] - a0)
            for k in range(S):
                m = ms[k][a0 : a0 + n]
                m2 = m2s[k][a0 : a0 + n]
                b0 = beta0[k, g]
                ik = invk[k, g]
                lam = lams[k]
                if snr:
                    for j in range(n):
                        t = abs(m[j]) / (np.sqrt(max(m2[j] * half + b0, tiny_b)) * ik)
                        E[j] = min(max(t, lo_t), hi_t)
                else:
                    for j in range(n):
                        t = one / (np.sqrt(max(m2[j] * half + b0, tiny_b)) * ik)
                        E[j] = min(max(t, lo_t), hi_t)
                if pcode == 0:
                    for j in range(n):
                        E[j] = np.sqrt(E[j])
                elif pcode == 2:
                    for j in range(n):
                        E[j] = E[j] * E[j]
                elif pcode == 3:
                    for j in range(n):
                        t = E[j] * E[j]
                        E[j] = t * t
                if eqv != 0:
                    for j in range(n):
                        E[j] = E[j] * keep + eqv
                if k == 0:
                    for j in range(n):
                        Q[j] = E[j] * inv_w
                        den[j] = E[j]
                    if uniform:
                        for j in range(n):
                            num[j] = lam * m[j]
                    else:
                        for j in range(n):
                            num[j] = E[j] * (lam * m[j])
                elif uniform:
                    for j in range(n):
                        x = E[j] * inv_w
                        q = Q[j]
                        Q[j] = q + x + q * x
                        num[j] += lam * m[j]
                else:
                    for j in range(n):
                        x = E[j] * inv_w
                        q = Q[j]
                        Q[j] = q + x + q * x
                        num[j] += E[j] * (lam * m[j])
                        den[j] += E[j]
            o = out[a0 : a0 + n]
            if uniform:
                for j in range(n):
                    den[j] = n_src
            if belief:
                for j in range(n):
                    q = min(Q[j], big)
                    bv = q / (one + q)
                    o[j] = (c_b * bv) * (num[j] / den[j])
                    Q[j] = bv
                acc += _sum64_c(Q[:n])
            else:
                for j in range(n):
                    o[j] = n_src * (num[j] / den[j])
            a0 += n
        bsum[g] = acc


def _scale(out: Any, starts: Any, ends: Any, inv: Any) -> None:
    for g in range(starts.shape[0]):
        f = inv[g]
        for i in range(starts[g], ends[g]):
            out[i] = np.float32(np.float64(out[i]) * f)


_m2_sums_c = _jit(_m2_sums)
_log_sums_c = _jit(_log_sums)
_evidence_out_c = _jit(_evidence_out)
_scale_c = _jit(_scale)


def _belief_bound(e: float, W: float, S: int) -> float:
    x = e / W
    if x == math.inf:
        return 1.0
    q = math.expm1(S * math.log1p(x)) if S * math.log1p(x) < 700 else math.inf
    return 1.0 if q == math.inf else q / (1.0 + q)


def gradient(
    names: Sequence[str],
    means: Sequence[np.ndarray],
    m2s: Sequence[np.ndarray],
    counts: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
    out: np.ndarray,
    segments: Sequence[int] | None,
    diagnostics: dict[str, Any] | None = None,
) -> bool:
    """Write ``calibrate(...).gradient`` into the flat float32 ``out`` with the compiled
    loops; ``False`` (``out`` possibly written) where the case is not theirs.

    ``means``/``m2s``: flat ``(D,)`` NumPy arrays; ``counts``: one Python
    float per source (anything else returns ``False``).
    """
    if not (AVAILABLE and ENABLED[0]):
        return False
    prior = config.prior
    gamma, L, W = float(config.gamma), float(config.clip), float(config.prior_weight)
    p = 2.0 * gamma
    belief = config.scale == "belief"
    f32 = np.float32
    if not (
        p in _POW_CODE
        and prior.kappa0 == 0
        and config.weights in ("evidence", "uniform")
        and config.s_max is None
        and out.dtype == f32
        and all(isinstance(n, float) for n in counts)
        and all(x.dtype == f32 and x.flags.c_contiguous for x in (*means, *m2s))
        and out.flags.c_contiguous
    ):
        return False
    fi = np.finfo(f32)
    tiny = float(fi.smallest_normal)
    S = len(means)
    D = int(means[0].shape[0])
    lengths = np.asarray([D] if segments is None else list(segments), dtype=np.int64)
    G = int(lengths.size)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    lens_f = lengths.astype(np.float64)
    ns = [float(n) for n in counts]

    # ---- pass A
    beta0 = np.zeros((S, G))
    zero_var = np.zeros((S, G), dtype=bool)
    if prior.beta0 is not None:
        beta0[:] = float(prior.beta0)
    else:
        if not all(n >= 2 for n in ns):
            return False
        tot = np.empty(G)
        for k in range(S):
            _m2_sums_c(m2s[k], starts, ends, tot)
            beta0[k] = float(prior.alpha0) * (tot / ns[k] / lens_f)
            zero_var[k] = ~(tot > 0)
    seg_equal = np.any(zero_var, axis=0) if prior.beta0 is None else np.zeros(G, dtype=bool)
    C = np.asarray(
        [math.log(max(prior.alpha0 + 0.5 * n, tiny)) + math.log(max(prior.kappa0 + n, tiny)) for n in ns]
    )
    beta0_32 = beta0.astype(f32)

    # ---- pass B
    ref = np.zeros(G)
    if not bool(np.all(seg_equal)):
        snr = config.evidence_from == "snr"
        if not snr:
            return False  # precision scores take the array engine's logs
        sums = np.empty((S, G))
        nzs = np.empty((S, G), dtype=np.int64)
        rb, mb = np.empty(_BL_B, dtype=f32), np.empty(_BL_B, dtype=f32)
        for k in range(S):
            bad = _log_sums_c(means[k], m2s[k], beta0_32[k], f32(tiny), starts, ends, rb, mb, sums[k], nzs[k])
            if bad:
                return False
        cnts = lens_f[None, :] - nzs
        total = np.sum(2.0 * sums + C[:, None] * cnts, axis=0)
        ref = total / np.maximum(np.sum(cnts, axis=0), 1.0)

    # ---- pass C: the engine's fast32 conditions
    lk = gamma * (C[:, None] - ref[None, :])
    lo, hi = math.exp(-L), math.exp(L)
    max_lk = float(np.max(np.abs(lk)))
    if not (
        p * 65.0 + max_lk / math.log(10.0) < 290.0
        and max_lk / p < 15.0 * math.log(10.0)
        and L / p < math.log(float(fi.max)) - 1.0
        and tiny < lo / W
        and hi / W < float(fi.max)
        and tiny < W < float(fi.max)
    ):
        return False
    b_lo, b_hi = _belief_bound(lo, W, S), _belief_bound(hi, W, S)
    if not (b_lo > 0.0 and b_hi / b_lo < 1e8):
        return False
    c_b = 1.0 / (math.sqrt(b_lo) * math.sqrt(b_hi))
    invk = np.exp(-lk / p).astype(f32)
    floor_beta = not bool(np.all(beta0 >= tiny))
    bsum = np.zeros(G)
    _evidence_out_c(
        tuple(means), tuple(m2s), np.asarray(lambdas, dtype=f32), beta0_32, invk,
        seg_equal.astype(f32), starts, ends, f32(tiny), f32(lo ** (1.0 / p)),
        f32(hi ** (1.0 / p)), f32(1.0 / W), f32(fi.max), _POW_CODE[p],
        config.evidence_from == "snr", config.weights == "uniform", belief, f32(c_b),
        f32(S), floor_beta, out, bsum,
    )

    # ---- pass D
    if belief:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv = float(S) / (c_b * (bsum / lens_f))
        _scale_c(out, starts, ends, inv)
    if diagnostics is not None:
        diagnostics["zero_variance_sources"] = [
            names[k] for k in range(S) if prior.beta0 is None and bool(zero_var[k].any())
        ]
        diagnostics["kernel"] = "numba"
    return True
