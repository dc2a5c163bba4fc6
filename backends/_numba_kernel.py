"""Compiled loops on the CPU (optional: need ``numba``): the gradient-only path's passes
and, for Stage 0, the moments of equal micro-batches (:func:`moments`).

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

import contextlib
import functools
import math
import types
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from bogc_core._types import CalibrationConfig

from ._scalars import MAX32, TINY32, fast32_fits, reference, score_consts, zero_variance_sources

__all__ = ["AVAILABLE", "ENABLED", "BAD", "gradient", "moments"]

#: What :func:`gradient` returns when the values check of a pass found a NaN, an
#: infinity or a negative ``M2`` before anything was written (the caller's own
#: check then names the offending array).
BAD = "bad values"

numba: Any
try:
    import numba
except ImportError:  # numba is not installed (it comes with the torch extra)
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
# Elements per source processed in one step of pass C: three float32 scratch
# vectors of this length stay in L2, and each source's run is long enough for
# the hardware prefetchers to stream it (2048 measured 10% slower at D = 1e7).
_BL = 8192
# Ratios per log in pass B: a product of this many mantissas in [1, 2) stays
# below 2^1000.
_BL_B = 1000
# Elements per work item: every segment is cut into items of this length
# (the last one shorter), whatever the thread count. Threads share out the
# items; each item's partial sums are computed by the same serial code and
# reduced in item order afterwards, so every result is bit-identical for any
# thread count (and across ranks).
_ITEM = 4 * _BL


# The summary arrays of a call without a summary (never written; the same types).
_NO_SUMMARY = (
    np.zeros(1, dtype=np.int64), np.zeros((1, 1)), np.zeros((1, 2), dtype=np.float32),
    np.zeros((1, 2), dtype=np.float32),
)


def _jit(fn: Any, flags: set[str] = _FM, parallel: bool = False) -> Any:
    if numba is None:
        return fn
    # error_model="numpy": a float division by zero gives inf/nan (no check
    # per element, which would also keep the loop from being vectorised).
    return numba.njit(
        cache=True, fastmath=flags, nogil=True, error_model="numpy", parallel=parallel
    )(fn)


def _prange(n: int) -> Any:
    return range(n)


# ``prange`` where numba is installed; plain ``range`` for the uncompiled
# functions otherwise (never called then).
prange: Any = numba.prange if numba is not None else _prange


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


def _m2_sums(m2: Any, istart: Any, iend: Any, part: Any) -> None:
    """Pass A: ``part[i] = sum M2`` over work item ``i`` (float64)."""
    for i in prange(istart.shape[0]):
        part[i] = _sum64_c(m2[istart[i] : iend[i]])


def _reduce_items(part: Any, iseg: Any, out: Any) -> None:
    """``out[g] = sum of part[i]`` over the items of segment ``g``, in item
    order: the fixed order that keeps the sums equal for any thread count."""
    for g in range(out.shape[0]):
        out[g] = 0.0
    for i in range(part.shape[0]):
        out[iseg[i]] += part[i]


def _log_block(
    mm: Any, vv: Any, b0: Any, tiny: Any, n: int, rb: Any, mb: Any, square: bool
) -> tuple[float, int, int, int]:
    """``sum log r`` over ``n`` ratios (``2 sum log r`` with ``square``: from
    ``r^2 = m^2 / beta``, no square root), the zero means, the ratios that
    are not normal float32 numbers and (``square`` only) the invalid inputs: a
    mean that is NaN or infinite, an ``M2`` that is NaN, infinite or negative."""
    half = np.float32(0.5)
    zero = np.float32(0.0)
    fmax = np.float32(3.4028234663852886e38)
    ri = rb.view(np.int32)
    mi = mb.view(np.int32)
    nz = 0
    ok = 0
    if square:
        for j in range(n):
            mv = mm[j]
            v = vv[j]
            ok += (abs(mv) <= fmax) & (v >= zero) & (v <= fmax)
            beta = max(v * half + b0, tiny)
            isz = mv == zero
            nz += isz
            # r = 0 exactly where the mean is zero: r + 1 is the factor 1.
            rb[j] = (mv * mv) / beta + np.float32(isz)
    else:
        for j in range(n):
            mv = mm[j]
            beta = max(vv[j] * half + b0, tiny)
            isz = mv == zero
            nz += isz
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
    return math.log(pr) + ex * math.log(2.0), nz, nb, (n - ok) if square else 0


_log_block_c = _jit(_log_block)


def _log_sums(
    m: Any, m2: Any, beta0: Any, tiny: Any, istart: Any, iend: Any, iseg: Any,
    part: Any, nzp: Any, badp: Any, invp: Any,
) -> None:
    """Pass B per work item ``i``: ``part[i] = sum log r`` over its non-zero
    means, ``nzp[i]`` its zero means, ``badp[i]`` its ratios that are not
    normal float32 numbers (the caller then takes the array engine's logs),
    ``invp[i]`` its invalid inputs (NaN or infinite ``m``; NaN, infinite or
    negative ``M2``): the values check, folded into the pass.

    A ratio ``r = 2^E f`` (``f`` in ``[1, 2)``) is split by its bits: the
    exponents are summed as integers, the mantissas multiplied in float64 (a
    product of ``_BL_B`` of them stays below ``2^1000``), one log per block.
    Each block first takes ``r^2 = m^2 / beta`` (a division, no square root);
    a block where some ``r^2`` is not a normal number (``m^2`` under- or
    overflows, ``|m| < 1.1e-19``) is taken again from ``r`` itself.
    """
    for i in prange(istart.shape[0]):
        rb = np.empty(_BL_B, dtype=np.float32)
        mb = np.empty(_BL_B, dtype=np.float32)
        b0 = beta0[iseg[i]]
        tot = 0.0
        nz = 0
        bad = 0
        inv = 0
        a0 = istart[i]
        while a0 < iend[i]:
            n = min(_BL_B, iend[i] - a0)
            mm = m[a0 : a0 + n]
            vv = m2[a0 : a0 + n]
            t2, z, nb, ni = _log_block_c(mm, vv, b0, tiny, n, rb, mb, True)
            inv += ni
            if nb == 0:
                tot += 0.5 * t2
            else:
                t, z, nb, _ = _log_block_c(mm, vv, b0, tiny, n, rb, mb, False)
                tot += t
                bad += nb
            nz += z
            a0 += n
        part[i] = tot
        nzp[i] = nz
        badp[i] = bad
        invp[i] = inv


def _summary_block(
    Es: Any, Q: Any, den: Any, n: int, a0: int, w_f: Any, inv_w: Any, big: Any,
    uniform: bool, pend: Any, acc: Any, lo: Any, hi: Any,
) -> None:
    """The diagnostics' reductions of one block of pass C, per part (``pend``: the
    parts' end offsets): the sums of ``e_k``, ``b_k``, ``u_k``, ``w_k``, the
    first maxima of ``w_k``, the sum of ``U`` (``acc[p]``, float64) and the
    ranges of ``e`` and ``B`` (``lo[p]``, ``hi[p]``). ``Q`` and ``den`` as the
    source loops left them."""
    S = Es.shape[0]
    one = np.float32(1.0)
    p = np.searchsorted(pend, a0, side="right")
    for j in range(n):
        while a0 + j >= pend[p]:
            p += 1
        q = min(Q[j], big)
        u_f = one / (one + q)
        bv = q / (one + q)
        d = den[j]
        best = -1.0
        kb = 0
        for k in range(S):
            e = Es[k, j]
            w = one / np.float32(S) if uniform else e / d
            acc[p, k] += e
            acc[p, S + k] += e / (e + w_f)
            acc[p, 2 * S + k] += w_f / (e + w_f)
            acc[p, 3 * S + k] += w
            if w > best:
                best = w
                kb = k
            lo[p, 0] = min(lo[p, 0], e)
            hi[p, 0] = max(hi[p, 0], e)
        acc[p, 4 * S + kb] += 1.0
        acc[p, 5 * S] += u_f
        lo[p, 1] = min(lo[p, 1], bv)
        hi[p, 1] = max(hi[p, 1], bv)


_summary_block_c = _jit(_summary_block)


def _evidence_block(
    ms: Any, m2s: Any, lams: Any, beta0: Any, invk: Any, g: int, eqv: Any, a0: int, n: int,
    tiny_b: Any, lo_t: Any, hi_t: Any, inv_w: Any, big: Any, pcode: int, snr: bool,
    uniform: bool, belief: bool, c_b: Any, n_src: Any, one_div: bool, out: Any, Q: Any,
    num: Any, den: Any, summ: bool, Es: Any, w_f: Any, pend: Any, sacc: Any, slo: Any,
    shi: Any,
) -> float:
    """Pass C over ``[a0, a0 + n)`` of segment ``g`` (``n <= _BL``): one loop per
    source (evidence and the running ``Q``, ``num``, ``den``) and one for the
    output. Returns ``sum B`` (belief scale), or else the number of
    non-finite gradient entries (the output check, folded into the pass).

    ``one_div`` (where ``(1 + Q) sum_k e_k`` cannot overflow): ``B = Q/(1+Q)``
    and ``g' = num/den`` from one reciprocal ``r = 1/((1 + Q) den)``, as
    ``B = Q (den r)`` and ``c B g' = c (Q (num r))``.

    ``summ``: also keep each ``e_k`` in ``Es`` and add the diagnostics'
    reductions of the block to ``sacc``, ``slo``, ``shi`` (:func:`_summary_block`)."""
    S = len(ms)
    half = np.float32(0.5)
    one = np.float32(1.0)
    keep = one - eqv
    for k in range(S):
        m = ms[k][a0 : a0 + n]
        m2 = m2s[k][a0 : a0 + n]
        b0 = beta0[k, g]
        ik = invk[k, g]
        lam = lams[k]
        first = k == 0
        for j in range(n):
            mv = m[j]
            top = abs(mv) if snr else one
            t = top / (np.sqrt(max(m2[j] * half + b0, tiny_b)) * ik)
            t = min(max(t, lo_t), hi_t)
            if pcode == 0:
                e = np.sqrt(t)
            elif pcode == 2:
                e = t * t
            elif pcode == 3:
                e = (t * t) * (t * t)
            else:
                e = t
            # e * 1 + 0 is e exactly: no branch for the segments without equal evidence
            e = e * keep + eqv
            if summ:
                Es[k, j] = e
            x = e * inv_w
            lm = lam * mv
            c = lm if uniform else e * lm
            if first:
                Q[j] = x
                num[j] = c
                den[j] = e
            else:
                q = Q[j]
                Q[j] = q + x + q * x
                num[j] += c
                den[j] += e
    if summ:
        _summary_block_c(Es, Q, den, n, a0, w_f, inv_w, big, uniform, pend, sacc, slo, shi)
    o = out[a0 : a0 + n]
    if belief and one_div:
        for j in range(n):
            q = Q[j]
            d = n_src if uniform else den[j]
            r = one / ((one + q) * d)
            o[j] = c_b * (q * (num[j] * r))
            Q[j] = q * (d * r)
        return _sum64_c(Q[:n])
    if belief:
        for j in range(n):
            q = min(Q[j], big)
            bv = q / (one + q)
            d = n_src if uniform else den[j]
            o[j] = (c_b * bv) * (num[j] / d)
            Q[j] = bv
        return _sum64_c(Q[:n])
    fmax = np.float32(3.4028234663852886e38)
    ok = 0
    for j in range(n):
        d = n_src if uniform else den[j]
        v = n_src * (num[j] / d)
        o[j] = v
        ok += abs(v) <= fmax
    return float(n - ok)


_evidence_block_c = _jit(_evidence_block)


def _evidence_out(
    ms: Any, m2s: Any, lams: Any, beta0: Any, invk: Any, eq: Any, istart: Any, iend: Any,
    iseg: Any, tiny: Any, lo_t: Any, hi_t: Any, inv_w: Any, big: Any, pcode: int, snr: bool,
    uniform: bool, belief: bool, c_b: Any, n_src: Any, floor_beta: bool, one_div: bool,
    out: Any, part: Any, summ: bool, w_f: Any, pend: Any, sacc: Any, slo: Any, shi: Any,
) -> None:
    """Pass C: ``out = c B g'`` (belief) or ``S g'``; ``part[i] = sum B`` over item
    ``i`` (belief) or its number of non-finite gradient entries."""
    tiny_b = tiny if floor_beta else np.float32(0.0)
    for i in prange(istart.shape[0]):
        # Three float32 scratch vectors of _BL elements per item (see _BL).
        Q = np.empty(_BL, dtype=np.float32)
        num = np.empty(_BL, dtype=np.float32)
        den = np.empty(_BL, dtype=np.float32)
        Es = np.empty((len(ms) if summ else 1, _BL), dtype=np.float32)
        g = iseg[i]
        acc = 0.0
        a0 = istart[i]
        while a0 < iend[i]:
            n = min(_BL, iend[i] - a0)
            acc += _evidence_block_c(
                ms, m2s, lams, beta0, invk, g, eq[g], a0, n, tiny_b, lo_t, hi_t, inv_w, big,
                pcode, snr, uniform, belief, c_b, n_src, one_div, out, Q, num, den, summ, Es,
                w_f, pend, sacc, slo, shi,
            )
            a0 += n
        part[i] = acc


def _scale(out: Any, istart: Any, iend: Any, iseg: Any, inv: Any, badp: Any) -> None:
    """Pass D: ``out *= inv[g]`` per segment; ``badp[i]``: the non-finite results of
    item ``i`` (the output check, folded into the pass)."""
    fmax = np.float32(3.4028234663852886e38)
    for i in prange(istart.shape[0]):
        f = inv[iseg[i]]
        o = out[istart[i] : iend[i]]
        ok = 0
        for j in range(o.shape[0]):
            v = np.float32(np.float64(o[j]) * f)
            o[j] = v
            ok += abs(v) <= fmax
        badp[i] = o.shape[0] - ok


_reduce_items_c = _jit(_reduce_items)


class _Loops(NamedTuple):
    """The passes over work items, compiled one way."""

    m2_sums: Any
    log_sums: Any
    evidence_out: Any
    scale: Any


def _renamed(fn: Any, suffix: str) -> Any:
    """``fn`` under the name ``<name><suffix>``: numba's on-disk cache keys a function by
    its name and signature, not by ``parallel``, so two compilations of one function
    would load each other's machine code."""
    g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__,
                           fn.__closure__)
    g.__qualname__ = fn.__qualname__ + suffix
    g.__doc__ = fn.__doc__
    return g


_ITEM_LOOPS = (_m2_sums, _log_sums, _evidence_out, _scale)
_PARALLEL = _Loops(*(_jit(f, parallel=True) for f in _ITEM_LOOPS))
# One thread takes the serial compilation: a parallel region, even on one thread,
# starts numba's pool (whose OpenMP runtime torch shares: its size becomes torch's
# thread count) and its idle workers spin after each region, taking a core from the
# caller.
_SERIAL = _Loops(*(_jit(_renamed(f, "_serial")) for f in _ITEM_LOOPS))


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """numba's thread count set to ``n`` for the duration of one call."""
    saved = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(saved)


def gradient(
    names: Sequence[str],
    means: Sequence[np.ndarray],
    m2s: Sequence[np.ndarray],
    counts: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
    out: np.ndarray,
    segments: Sequence[int] | None,
    c_b: float | None,
    diagnostics: dict[str, Any] | None = None,
    check: bool = False,
    summary: tuple[np.ndarray, ...] | None = None,
    threads: int = 1,
) -> bool | str:
    """Write ``calibrate(...).gradient`` into the flat float32 ``out`` with the compiled
    loops and return ``True``; ``False`` where the case is not theirs (``out`` not
    written).

    ``means``/``m2s``: flat ``(D,)`` NumPy arrays; ``counts``: one Python
    float per source (anything else returns ``False``). ``c_b``: the constant
    that centres the range of the fused belief on 1 (``None`` where the range
    is too wide for one constant, which the loops do not take).

    ``check``: the values check of ``calibrate_gradient(check_values=True)``,
    folded into the passes: pass B also counts the NaN and infinite means and
    the NaN, infinite and negative ``M2`` (returning :data:`BAD` before
    anything is written), and the pass that writes the final gradient counts
    its non-finite entries (``diagnostics["finite"]`` tells whether there
    were none). ``True`` with ``check`` means every input value was verified.

    ``summary``: ``(pend, acc, lo, hi, zero_var, mean_b)``, arrays that pass C
    fills with the diagnostics' reductions per part (``pend``: the parts' end
    offsets, refining the segments; see :func:`_summary_block`), and the
    zero-variance flags ``(S, G)`` and mean fused belief ``(G,)`` of every
    segment. The call then runs on one thread (the same bits as any other).

    ``threads``: the caller's thread count (at most numba's pool); one runs the
    serial compilation, which starts no pool.
    """
    if not (AVAILABLE and ENABLED[0]):
        return False
    prior = config.prior
    p = 2.0 * float(config.gamma)
    f32 = np.float32
    if not (c_b is not None and p in _POW_CODE and prior.kappa0 == 0
            and config.weights in ("evidence", "uniform") and config.s_max is None
            and out.dtype == f32 and out.flags.c_contiguous
            and all(isinstance(n, float) for n in counts)
            and all(x.dtype == f32 and x.flags.c_contiguous for x in (*means, *m2s))):
        return False
    threads = 1 if summary is not None else max(1, min(threads, int(numba.config.NUMBA_NUM_THREADS)))
    loops = _SERIAL if threads == 1 else _PARALLEL
    with _threads(threads) if threads > 1 else contextlib.nullcontext():
        gamma, L, W = float(config.gamma), float(config.clip), float(config.prior_weight)
        belief = config.scale == "belief"
        tiny = TINY32
        S = len(means)
        D = int(means[0].shape[0])
        lens_f, istart, iend, iseg = _items((D,) if segments is None else tuple(segments))
        G = int(lens_f.size)
        part = np.empty(istart.size)
        ns = [float(n) for n in counts]
        if check and not all(math.isfinite(n) and n >= 0 for n in ns):
            return BAD

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
                loops.m2_sums(m2s[k], istart, iend, part)
                _reduce_items_c(part, iseg, tot)
                beta0[k] = float(prior.alpha0) * (tot / ns[k] / lens_f)
                zero_var[k] = ~(tot > 0)
        seg_equal = zero_var.any(axis=0) if prior.beta0 is None else np.zeros(G, dtype=bool)
        all_equal = bool(seg_equal.all())
        C = score_consts(prior, ns, tiny)
        beta0_32 = beta0.astype(f32)

        # ---- pass B
        ref = np.zeros(G)
        if all_equal and check:
            return False  # pass B, which checks the values, has nothing to do
        if not all_equal:
            snr = config.evidence_from == "snr"
            if not snr:
                return False  # precision scores take the array engine's logs
            sums = np.empty((S, G))
            nzs = np.empty((S, G), dtype=np.int64)
            nzp = np.empty(istart.size, dtype=np.int64)
            badp = np.empty(istart.size, dtype=np.int64)
            invp = np.empty(istart.size, dtype=np.int64)
            for k in range(S):
                loops.log_sums(
                    means[k], m2s[k], beta0_32[k], f32(tiny), istart, iend, iseg, part, nzp, badp,
                    invp,
                )
                if check and invp.any():
                    return BAD
                if badp.any():
                    return False
                _reduce_items_c(part, iseg, sums[k])
                nzs[k] = np.bincount(iseg, weights=nzp, minlength=G).astype(np.int64)
            ref = reference(2.0 * sums, lens_f[None, :] - nzs, C)

        # ---- pass C: the engine's fast32 conditions
        lk = gamma * (C[:, None] - ref[None, :])
        lo, hi = math.exp(-L), math.exp(L)
        if not fast32_fits(p, lk, L, W):
            return False
        invk = np.exp(-lk / p).astype(f32)
        floor_beta = not bool(np.all(beta0 >= tiny))
        # S lo <= (1 + Q) sum_k e_k < (1 + hi/W)^S S hi must stay inside the float32
        # range (margins of 2^8 for round-off), so that neither it nor r = 1/it overflows.
        log_big = math.log(MAX32) - 8.0 * math.log(2.0)
        one_div = S * math.log1p(hi / W) + math.log(S * hi) < log_big and math.log(S * lo) > -log_big
        bsum = np.zeros(G)
        loops.evidence_out(
            tuple(means), tuple(m2s), np.asarray(lambdas, dtype=f32), beta0_32, invk,
            seg_equal.astype(f32), istart, iend, iseg, f32(tiny), f32(lo ** (1.0 / p)),
            f32(hi ** (1.0 / p)), f32(1.0 / W), f32(MAX32), _POW_CODE[p],
            config.evidence_from == "snr", config.weights == "uniform", belief, f32(c_b),
            f32(S), floor_beta, one_div, out, part, summary is not None, f32(W),
            *(summary or _NO_SUMMARY)[:4],
        )
        # ---- pass D
        if belief:
            _reduce_items_c(part, iseg, bsum)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                inv = float(S) / (c_b * (bsum / lens_f))
            nonfinite = np.empty(istart.size, dtype=np.int64)
            loops.scale(out, istart, iend, iseg, inv, nonfinite)
            finite = not nonfinite.any()
        else:
            finite = not part.any()  # pass C counted the non-finite entries
        if summary is not None:
            summary[4][...] = zero_var
            summary[5][...] = bsum / lens_f if belief else math.nan
        if diagnostics is not None:
            diagnostics["finite"] = finite
            diagnostics["zero_variance_sources"] = zero_variance_sources(names, zero_var, prior)
            diagnostics["kernel"] = "numba"
        return True


def _moments(x: Any, inv: Any, mean: Any, m2: Any) -> None:
    """Stage 0 of ``C`` equal micro-batches: ``mean = mean_j s_j``, ``m2 = sum_j (s_j -
    mean)^2`` of the samples ``s_j = inv x_j``, the rows of ``x`` ``(C, n)``, scaled first
    (as their own moments would be); row by row, so every loop runs along contiguous memory."""
    C, n = x.shape
    r = x.dtype.type(1.0 / C)
    for j in range(n):
        mean[j] = x[0, j] * inv
    for c in range(1, C):
        for j in range(n):
            mean[j] += x[c, j] * inv
    for j in range(n):
        mean[j] *= r
        m2[j] = 0
    for c in range(C):
        for j in range(n):
            d = x[c, j] * inv - mean[j]
            m2[j] += d * d


moments = _jit(_moments)


@functools.lru_cache(maxsize=256)
def _items(lengths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The segments' lengths (float64) and their work items of at most ``_ITEM`` elements:
    ``(start, end, segment)`` per item, in order (a segment of length 0 has none). Kept per
    layout (a training step calls with the same one each time); never written."""
    lens = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lens)
    starts = ends - lens
    nch = -(-lens // _ITEM)
    iseg = np.repeat(np.arange(lens.size, dtype=np.int64), nch)
    first = np.cumsum(nch) - nch
    off = np.arange(iseg.size, dtype=np.int64) - np.repeat(first, nch)
    istart = starts[iseg] + off * _ITEM
    iend = np.minimum(istart + _ITEM, ends[iseg])
    return lens.astype(np.float64), istart, iend, iseg
