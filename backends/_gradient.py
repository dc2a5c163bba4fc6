"""The engine: the calibration passes, over flat statistics cut into segments (groups).

Every fast path runs this engine, for ``calibrate`` and ``calibrate_gradient``
alike. It computes ``calibrate(...).gradient`` (``docs/method.md``, Stages
1-5) for ``S`` sources over one-dimensional statistics of length ``D`` cut
into ``G`` segments, each its own group (own empirical-Bayes ``vbar``, own
evidence reference ``ref``, own mean fused belief), without materialising any
``(S, D)`` array. Only the gradient is written, unless :class:`Outputs` asks
the same passes to write the evidence ``e``, the weights ``w``, the fused
uncertainty ``U`` and the belief scale ``s`` into caller buffers too (the
full :class:`~bogc_core.Calibration`).

Passes (the group reductions force them; each pass walks the statistics in
cache-sized *blocks*, and reductions per segment are taken inside a block by
one ``reduceat``-style call, so no Python loop runs over segments):

A. (empirical-Bayes prior only) per source and segment, ``sum M2`` (or, with
   per-dimension counts, ``sum_{n>=2} M2/n`` and the number of such
   dimensions): ``beta0_kg = alpha0 * vbar_kg`` and the zero-variance test.
B. Per source and segment, the sum and number of the finite log scores
   ``l = C_k + y``: ``ref_g``.
   With one count per source this is ``2 log(|mu| / sqrt(beta))``, one log
   per score, and, in a block of one segment whose ratios lie within
   ``2^-31 .. 2^31``, one log per four scores (the log of their product).
C. Per dimension: evidence, fused belief ``B = Q/(1+Q)`` with
   ``Q = prod_k(1 + e_k/W) - 1``, weights, and ``c B sum_k w_k lambda_k mu_k``
   written to ``out`` (``c`` centres the range of ``B`` on 1); per segment,
   ``sum B``.
D. In place on ``out``: ``*= S / (c mean_g(B))`` (with ``s_max``, ``B`` is
   kept in a scratch vector and ``s = min(B/mean, s_max)`` is applied instead).

Precision: pass B (with ``kappa0 = 0``) and the float32 power form of pass C
work in the input dtype, as the reference's own arithmetic, arranged so that
an over- or underflow lands where the reference's value lies anyway (a ratio
that is not a normal number takes the reference's separate logs); everything
else works in float64, so no intermediate over- or underflows where the
reference (which takes each logarithm separately) stays finite. Sums are
accumulated in float64.

Evidence without transcendentals. With a scalar count and ``2 gamma`` in
``{1/2, 1, 2, 4}``, ``e = exp(gamma (l - ref))`` is ``r^(2 gamma) K`` with
``r = |mu| / sqrt(beta)`` (``snr``) or ``r = 1 / sqrt(beta)``
(``precision``) and ``K = exp(gamma (C_k - ref_g))`` one scalar per source
and segment; a square root replaces a log and an exp. A zero mean gives
``r = 0``, so ``e`` lands on the clip floor ``exp(-L)`` by the clip itself:
the log score ``-inf`` needs no branch and no recomputation. The general
path (any ``gamma``, per-dimension counts, float64 inputs whose ratios can
leave the float64 range) takes the logarithms as the reference does, with
``log 0 = -inf`` mapped to the floor by the same clip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bogc_core._fusion import belief_bound as _belief_bound
from bogc_core._types import CalibrationConfig, Decline
from bogc_core._weights import gauss_legendre01

from ._scalars import (
    LOG10_RANGE,
    MAX32,
    fast32_fits,
    reference,
    score_consts,
    zero_variance_sources,
)

__all__ = ["FEW_SAMPLES", "Shim", "NumpyShim", "Outputs", "Plan", "Summary", "plan_blocks",
           "gradient", "gauss_legendre01"]

# A log score is at least 2*log(smallest subnormal) - log(largest float) >
# -2200 (float64) when finite; -inf (a zero mean) is lifted to this floor so
# a block sum stays finite, and the floor's contributions are taken back out.
_LFLOOR = -1.0e4
_POWERS = {0.5: "sqrt", 1.0: "one", 2.0: "square", 4.0: "square2"}
_np_clip: Any = getattr(np, "_core", np).umath.clip
#: The reason to decline where the reference raises InsufficientSamplesError.
FEW_SAMPLES = "fewer than 2 samples in every dimension (the reference raises)"


class Shim:
    """The few array operations the engine needs, for one array library.

    Work arrays are float64; ``segsum`` and ``expand`` take the block's
    segment layout from :class:`Plan`.
    """

    xp: Any

    def work(self, x: Any) -> Any:
        """``x`` as a float64 array (may be ``x`` itself: the engine never writes into it)."""
        return self.xp.asarray(x, dtype=self.xp.float64)

    def segsum(self, x: Any, offsets: Any) -> Any:
        """Sums of ``x`` over the runs starting at ``offsets`` (float64)."""
        raise NotImplementedError

    def expand(self, vals: Any, counts: Any) -> Any:
        """``vals[i]`` repeated ``counts[i]`` times."""
        raise NotImplementedError

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.xp.zeros(shape, dtype=self.xp.float64)

    def index(self, x: np.ndarray) -> Any:
        """A host int64 array as this library's index array (by default the host
        layout itself, from which ``segsum`` and ``expand`` build what they need)."""
        return x

    def asarray(self, x: Any) -> Any:
        """Host values as a float64 array of this library."""
        return self.work(x)

    def store(self, dst: Any, src: Any) -> None:
        """``dst[...] = src`` with a cast to ``dst``'s dtype."""
        dst[...] = src

    def cast(self, x: Any, like: Any) -> Any:
        """``x`` in the dtype of the array ``like``."""
        return x.astype(like.dtype)

    def clip(self, x: Any, lo: float | None, hi: float | None) -> Any:
        """``x`` clipped to ``[lo, hi]`` (``None``: no bound)."""
        return self.xp.clip(x, lo, hi)

    def total(self, x: Any) -> Any:
        """Sum of ``x`` in at least float64 accuracy (a 0-d array or a float)."""
        return self.xp.sum(x, dtype=self.xp.float64)

    def count_true(self, mask: Any) -> Any:
        return self.xp.sum(mask, dtype=self.xp.float64)

    def to_host(self, x: Any) -> np.ndarray:
        raise NotImplementedError


class NumpyShim(Shim):
    xp = np

    def segsum(self, x: Any, offsets: Any) -> Any:
        return np.add.reduceat(x, offsets, dtype=np.float64)

    def clip(self, x: Any, lo: float | None, hi: float | None) -> Any:
        # The clip ufunc itself: np.clip's Python wrapper, and even
        # np.maximum with a scalar, cost more than the operation on a block.
        return _np_clip(x, -np.inf if lo is None else lo, np.inf if hi is None else hi)

    def total(self, x: Any) -> Any:
        # Pairwise summation in the block's own dtype is accurate to a few
        # ulps of the sum; a float64 cast would cost more than the sum. It is
        # taken only where the float32 sum overflows (float32 M2 ~ 1e33 over
        # 1e5 dimensions), so the result does not depend on numba's presence.
        t = float(np.add.reduce(x, axis=None))
        if math.isfinite(t) or x.dtype == np.float64:
            return t
        return float(np.add.reduce(x, axis=None, dtype=np.float64))

    def count_true(self, mask: Any) -> Any:
        return float(np.count_nonzero(mask))

    def expand(self, vals: Any, counts: Any) -> Any:
        return np.repeat(vals, counts)

    def store(self, dst: Any, src: Any) -> None:
        np.copyto(dst, src, casting="unsafe")

    def to_host(self, x: Any) -> np.ndarray:
        return np.asarray(x)


@dataclass
class Plan:
    """Blocks ``[a, b)`` over ``D`` and, per block, its segments ``g0..g1``.

    ``offsets[i]``/``counts[i]`` (host NumPy or the shim's arrays) describe
    the runs of segments inside block ``i``; ``None`` when the block lies in
    one segment, so a reduction is a plain sum and a segment value a scalar.
    """

    D: int
    G: int
    lengths: np.ndarray
    blocks: list[tuple[int, int, int, int]] = field(default_factory=list)
    offsets: list[Any] = field(default_factory=list)
    counts: list[Any] = field(default_factory=list)


def plan_blocks(D: int, segments: Sequence[int] | None, block: int, shim: Shim) -> Plan:
    lengths = np.asarray([D] if segments is None else list(segments), dtype=np.int64)
    G = int(lengths.size)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    a_all = np.arange(0, D, block, dtype=np.int64)
    b_all = np.minimum(a_all + block, D)
    g0s = np.searchsorted(ends, a_all, side="right")
    g1s = np.searchsorted(ends, b_all - 1, side="right")
    plan = Plan(D, G, lengths)
    for a, b, g0, g1 in zip(a_all.tolist(), b_all.tolist(), g0s.tolist(), g1s.tolist()):
        plan.blocks.append((a, b, g0, g1))
        if g0 == g1:
            plan.offsets.append(None)
            plan.counts.append(None)
        else:
            off = np.maximum(starts[g0 : g1 + 1], a) - a
            cnt = np.diff(np.append(off, b - a))
            plan.offsets.append(shim.index(off))
            plan.counts.append(shim.index(cnt))
    return plan


@dataclass
class Outputs:
    """Flat buffers (input dtype) that the passes fill besides the gradient:
    ``e`` and ``w`` of shape ``(S, D)``, ``U`` and ``s`` of shape ``(D,)``."""

    e: Any
    w: Any
    U: Any
    s: Any


class Summary:
    """Per-part reductions that the passes accumulate for the diagnostics
    (``bogc_core._diagnostics.Reductions``), so a diagnostics step makes one pass.

    ``parts``: lengths of the parts to report on, a refinement of the call's
    segments (each part lies inside one segment), or ``None`` for the segments
    themselves. Pass C adds, per part, the sums of ``e_k``, ``b_k``, ``u_k``,
    ``w_k``, the first-maximum counts of ``w_k``, the sum of ``U`` and the
    ranges of ``e`` and ``B``; pass D the count of non-finite gradient entries
    and each part's segment mean of ``B`` (for the range of ``s``). Host
    float64 arrays, filled by :func:`gradient`.
    """

    def __init__(self, parts: Sequence[int] | None) -> None:
        self.parts = None if parts is None else [int(n) for n in parts]
        self.plan: Plan | None = None
        #: per segment, mean B (None without the belief scale), set by pass D
        self.mean_b: np.ndarray | None = None

    def start(self, shim: Shim, D: int, S: int, block: int, segments: Sequence[int] | None,
              zero_var: np.ndarray) -> None:
        lengths = self.parts if self.parts is not None else segments
        self.plan = plan_blocks(D, lengths, block, shim)
        self.host = plan_blocks(D, lengths, block, NumpyShim())
        P = self.plan.G
        seg_ends = np.cumsum([D] if segments is None else list(segments))
        part_starts = np.cumsum(self.plan.lengths) - self.plan.lengths
        #: the segment of each part
        self.group = np.searchsorted(seg_ends, part_starts, side="right")
        self.lengths = self.plan.lengths.astype(np.float64)
        self.zero_var = zero_var[:, self.group]
        self.bad = shim.zeros((P,))
        # Per block: its first part and its partial sums (e, b, u, w, top per
        # source; U) and ranges; reduced in block order by finish(), so the
        # result is the same for any thread count.
        self.blocks: list[Any] = [None] * len(self.plan.blocks)
        self.S = S

    def arrays(self, S: int, D: int, segments: Sequence[int] | None) -> tuple[np.ndarray, ...]:
        """The arrays the compiled loops fill (``_numba_kernel.gradient``'s ``summary``)."""
        parts = self.parts if self.parts is not None else ([D] if segments is None else segments)
        P, G = len(parts), 1 if segments is None else len(segments)
        return (
            np.cumsum(np.asarray(parts, dtype=np.int64)), np.zeros((P, 5 * S + 1)),
            np.full((P, 2), np.inf, dtype=np.float32), np.full((P, 2), -np.inf, dtype=np.float32),
            np.zeros((S, G), dtype=bool), np.zeros(G),
        )

    def from_loops(self, shim: Shim, D: int, S: int, block: int, segments: Sequence[int] | None,
                   arrays: tuple[np.ndarray, ...], out: Any) -> None:
        """Take the reductions the compiled loops accumulated into ``arrays``."""
        _, acc, lo, hi, zero_var, mean_b = arrays
        self.start(shim, D, S, block, segments, zero_var)
        self.blocks = [(0, acc.T, lo.T.astype(np.float64), hi.T.astype(np.float64))]
        self.add_gradient(shim, out)
        self.mean_b = None if np.isnan(mean_b).all() else mean_b

    def add_block(self, shim: Shim, i: int, es: list[Any], ws: list[Any], Bv: Any, U: Any,
                  W: float) -> None:
        assert self.plan is not None
        xp = shim.xp
        S = self.S
        a, b, g0, g1 = self.plan.blocks[i]
        off = self.plan.offsets[i]
        sums = shim.zeros((5 * S + 1, g1 - g0 + 1))
        lo = np.full((2, g1 - g0 + 1), math.inf)  # min e, min B
        hi = np.full((2, g1 - g0 + 1), -math.inf)  # max e, max B
        rows = []
        for e in es:
            rows.append((e, e / (e + W), W / (e + W)))
        mx = ws[0]
        for w in ws[1:]:
            mx = xp.maximum(mx, w)
        taken = None
        for k in range(S):
            e, bk, uk = rows[k]
            top = ws[k] == mx
            if taken is not None:
                top = xp.logical_and(top, xp.logical_not(taken))
            taken = top if taken is None else xp.logical_or(taken, top)
            for j, x in enumerate((e, bk, uk, ws[k], shim.work(top))):
                _add_seg(shim, sums[j * S + k], x, off, 0, g1 - g0)
        _add_seg(shim, sums[5 * S], U, off, 0, g1 - g0)
        hoff = self.host.offsets[i]
        cuts = [(0, 0, b - a)] if hoff is None else [
            (j, int(o), int(o) + int(n))
            for j, (o, n) in enumerate(zip(hoff.tolist(), self.host.counts[i].tolist()))
        ]
        for g, c0, c1 in cuts:
            for r, xs in enumerate(([e for e, _, _ in rows], [Bv])):
                for x in xs:
                    part = x[c0:c1]
                    lo[r, g] = min(lo[r, g], float(xp.min(part)))
                    hi[r, g] = max(hi[r, g], float(xp.max(part)))
        self.blocks[i] = (g0, shim.to_host(sums), lo, hi)

    def add_gradient(self, shim: Shim, out: Any) -> None:
        """Count the non-finite entries of the finished gradient, per part."""
        assert self.plan is not None
        xp = shim.xp
        for i, (a, b, g0, g1) in enumerate(self.plan.blocks):
            _add_seg(shim, self.bad, shim.work(xp.logical_not(xp.isfinite(out[a:b]))),
                     self.plan.offsets[i], g0, g1)

    def finish(self, shim: Shim, s_max: float | None) -> list[dict[str, Any]]:
        """Per part, the fields of ``bogc_core._diagnostics.Reductions``."""
        S, n = self.S, self.lengths
        mean_b = self.mean_b
        P = n.size
        sums = np.zeros((5 * S + 1, P))
        self.lo, self.hi = np.full((2, P), math.inf), np.full((2, P), -math.inf)
        for g0, part, lo, hi in self.blocks:
            g1 = g0 + part.shape[1]
            sums[:, g0:g1] += part
            self.lo[:, g0:g1] = np.minimum(self.lo[:, g0:g1], lo)
            self.hi[:, g0:g1] = np.maximum(self.hi[:, g0:g1], hi)
        sums = sums / n[None, :]
        bad = shim.to_host(self.bad)
        if mean_b is None:  # no belief scale: s = 1
            s_lo = s_hi = np.ones_like(n)
        else:
            mb = mean_b[self.group]
            s_lo, s_hi = self.lo[1] / mb, self.hi[1] / mb
            if s_max is not None:
                s_lo, s_hi = np.minimum(s_lo, s_max), np.minimum(s_hi, s_max)
        out = []
        for g in range(n.size):
            col = sums[:, g].tolist()
            out.append(dict(
                num_dims=int(n[g]),
                evidence=col[0:S], belief=col[S:2 * S], uncertainty=col[2 * S:3 * S],
                weight=col[3 * S:4 * S], top=col[4 * S:5 * S], fused_uncertainty=col[5 * S],
                belief_scale_min=float(s_lo[g]), belief_scale_max=float(s_hi[g]),
                evidence_min=float(self.lo[0, g]), evidence_max=float(self.hi[0, g]),
                nonfinite=bool(bad[g] > 0),
            ))
        return out


@dataclass
class _Src:
    m: Any  # flat mean, input dtype
    m2: Any  # flat M2, input dtype
    n: Any  # Python float, or flat per-dimension counts
    lam: float


def gradient(shim: Shim, names: Sequence[str], means: Sequence[Any], m2s: Sequence[Any],
             counts: Sequence[Any], lambdas: Sequence[float], config: CalibrationConfig, out: Any,
             segments: Sequence[int] | None, block: int, tiny: float, float32: bool,
             diagnostics: dict[str, Any] | None = None, threads: int = 1,
             outputs: Outputs | None = None, summary: Summary | None = None,
             check: Callable[[], None] | None = None) -> Any:
    """Write ``calibrate(...).gradient`` of every segment into the flat ``out``; return it.

    ``means``/``m2s``: one flat ``(D,)`` array per source (input dtype);
    ``counts``: per source a Python float (one count everywhere) or a flat
    ``(D,)`` array. ``tiny`` is the input dtype's smallest normal number,
    which the reference uses as the floor of ``alpha``, ``kappa``, ``beta``.
    Raises :class:`Decline` where the reference raises. ``threads > 1`` runs
    the compiled loops on that many threads, or else passes B and C, each
    thread over a contiguous run of blocks with its own partial sums (NumPy and
    PyTorch release the GIL inside each array operation). ``outputs``: also write ``e, w, U, s`` there. ``summary``:
    accumulate the diagnostics' reductions there. ``check``: the
    values check of the statistics (raises on NaN, inf, negative ``M2``), which
    the compiled loops fold into their passes (then ``diagnostics["finite"]``
    tells whether the gradient they wrote is finite); otherwise it runs here,
    before any pass.
    """
    S = len(means)
    gamma, L, W = float(config.gamma), float(config.clip), float(config.prior_weight)
    lo, hi = math.exp(-L), math.exp(L)
    # out holds (c B) g' until pass D; c centres B's range [B_lo, B_hi] on 1 so
    # the product neither under- nor overflows where B g' would (tiny B with a
    # huge prior weight). Where the range is too wide, B goes to a scratch.
    b_lo, b_hi = _belief_bound(lo, W, S), _belief_bound(hi, W, S)
    wide = not (b_lo > 0.0 and b_hi / b_lo < 1e8)
    c_b = 1.0 if wide else 1.0 / (math.sqrt(b_lo) * math.sqrt(b_hi))
    result = out
    D = int(means[0].shape[0])
    if float32 and isinstance(shim, NumpyShim) and outputs is None:
        # The compiled loops, where numba is installed and the case is theirs.
        from . import _numba_kernel

        arrays = None if summary is None else summary.arrays(S, D, segments)
        done = _numba_kernel.gradient(
            names, means, m2s, counts, lambdas, config, out, segments, None if wide else c_b,
            diagnostics, check is not None, arrays, threads,
        )
        if done is True:
            if summary is not None and arrays is not None:
                summary.from_loops(shim, D, S, block, segments, arrays, out)
            return out
    if check is not None:
        check()  # the values check, where the compiled loops did not make it
    xp = shim.xp
    prior = config.prior
    srcs = [_Src(m, m2, n, float(lam)) for m, m2, n, lam in zip(means, m2s, counts, lambdas)]
    per_dim = any(not isinstance(s.n, float) for s in srcs)
    plan = plan_blocks(D, segments, block, shim)
    G = plan.G
    lengths = plan.lengths.astype(np.float64)

    # ---- pass A: beta0 per (source, segment) and the zero-variance flags
    beta0 = np.zeros((S, G))
    zero_var = np.zeros((S, G), dtype=bool)
    if prior.beta0 is not None:
        beta0[:] = float(prior.beta0)
    else:
        for k, s in enumerate(srcs):
            tot_h = _segment_totals(shim, plan, s.m2)
            zero_var[k] = ~(tot_h > 0)
            if isinstance(s.n, float):
                if not s.n >= 2:
                    raise Decline(FEW_SAMPLES)
                beta0[k] = float(prior.alpha0) * (tot_h / s.n / lengths)
                continue
            n, m2 = s.n, s.m2
            nv, vs = shim.zeros((G,)), shim.zeros((G,))
            _accumulate(shim, plan, nv, lambda a, b, n=n: shim.work(n[a:b] >= 2))
            _accumulate(shim, plan, vs, lambda a, b, n=n, m2=m2: _masked_var(shim, n[a:b], m2[a:b]))
            nv_h = shim.to_host(nv)
            if not bool(np.all(nv_h > 0)):
                raise Decline(FEW_SAMPLES)
            beta0[k] = float(prior.alpha0) * (shim.to_host(vs) / nv_h)
    seg_equal = np.any(zero_var, axis=0) if prior.beta0 is None else np.zeros(G, dtype=bool)
    if diagnostics is not None:
        diagnostics["zero_variance_sources"] = zero_variance_sources(names, zero_var, prior)
    if summary is not None:
        summary.start(shim, D, S, block, segments, zero_var)

    C = score_consts(prior, [s.n for s in srcs], tiny)
    snr = config.evidence_from == "snr"

    # ---- pass B: ref per segment. With kappa0 = 0 (mu = m) the scores are
    # taken in the input dtype, as the reference takes them; sums in float64.
    ref = np.zeros(G)
    native_b = prior.kappa0 == 0
    if gamma != 0.0 and not bool(np.all(seg_equal)):
        beta0_d = shim.asarray(beta0)
        beta0_n = shim.cast(beta0_d, means[0]) if native_b else beta0_d

        def pass_b(i: int, acc: tuple[Any, Any]) -> None:
            sums, cnts = acc
            a, b, g0, g1 = plan.blocks[i]
            off, cnt = plan.offsets[i], plan.counts[i]
            for k, s in enumerate(srcs):
                if native_b:
                    mu = s.m[a:b]
                    beta = s.m2[a:b] * 0.5 + _seg_vals(shim, beta0_n[k], g0, g1, cnt)
                else:
                    mu = _mu(shim, s, a, b, prior)
                    beta = _beta(shim, s, a, b, prior, _seg_vals(shim, beta0_d[k], g0, g1, cnt), mu)
                if snr and isinstance(s.n, float):
                    _score_sums(shim, s, a, b, prior, beta, mu, tiny, sums[k], cnts[k], off, g0, g1)
                elif snr:
                    _score_sums_two_logs(shim, s, a, b, prior, beta, mu, tiny, sums[k], cnts[k], off, g0, g1)
                else:
                    y = _log_part(shim, s, a, b, prior, beta, mu, snr, tiny)
                    _add_seg(shim, sums[k], y, off, g0, g1)

        accs = _run_blocks(
            len(plan.blocks), threads, lambda: (shim.zeros((S, G)), shim.zeros((S, G))), pass_b
        )
        sums = sum(acc[0] for acc in accs[1:]) + accs[0][0] if len(accs) > 1 else accs[0][0]
        cnts = sum(acc[1] for acc in accs[1:]) + accs[0][1] if len(accs) > 1 else accs[0][1]
        sums_h, cnts_h = shim.to_host(sums), shim.to_host(cnts)
        # cnts holds minus the number of zero means; add the segment lengths.
        ref = reference(sums_h, cnts_h + lengths[None, :], C)

    # ---- pass C: evidence, fused belief, weights, B * g' (or g') into out
    p = 2.0 * gamma
    lk = gamma * (C[:, None] - ref[None, :])  # (S, G): log K
    power = (not per_dim and float32 and p in _POWERS
             and p * 65.0 + float(np.max(np.abs(lk))) / math.log(10.0) < LOG10_RANGE)
    K = np.exp(lk) if power else None
    fast32 = power and prior.kappa0 == 0 and fast32_fits(p, lk, L, W)
    belief = config.scale == "belief"
    keep_b = belief and (config.s_max is not None or wide or outputs is not None)
    if outputs is not None:
        bscratch = outputs.s  # B until pass D turns it into s
    else:
        bscratch = xp.empty_like(out) if keep_b else None
    eq_d = shim.asarray(seg_equal.astype(np.float64))
    beta0_d = shim.asarray(beta0)
    K_d = shim.asarray(K) if K is not None else None
    lk_d = shim.asarray(lk)
    big = MAX32 if fast32 else float(np.finfo(np.float64).max)
    q_may_overflow = S * math.log1p(hi / W) >= math.log(big)
    any_equal = bool(np.any(seg_equal))
    if fast32:
        eq_d = shim.cast(eq_d, means[0])
        beta0_d = shim.cast(beta0_d, means[0])
        invk_d = shim.cast(shim.asarray(np.exp(-lk / p)), means[0])
        lo_t, hi_t = lo ** (1.0 / p), hi ** (1.0 / p)
        floor_beta = not bool(np.all(beta0 >= tiny))
    def pass_c(i: int, bsum: Any) -> None:
        a, b, g0, g1 = plan.blocks[i]
        off, cnt = plan.offsets[i], plan.counts[i]
        es, mus = [], []
        for k, s in enumerate(srcs):
            if fast32:
                m = s.m[a:b]
                mus.append(m)
                beta = s.m2[a:b] * 0.5 + _seg_vals(shim, beta0_d[k], g0, g1, cnt)
                if floor_beta:
                    beta = shim.clip(beta, tiny, None)
                t = xp.sqrt(beta) * _seg_vals(shim, invk_d[k], g0, g1, cnt)
                t = shim.clip((xp.abs(m) / t) if snr else (1.0 / t), lo_t, hi_t)
                e = _power(xp, t, p)
                if any_equal:
                    eqv = _seg_vals(shim, eq_d, g0, g1, cnt)
                    e = e * (1.0 - eqv) + eqv
                es.append(e)
                continue
            mu = _mu(shim, s, a, b, prior)
            mus.append(mu)
            if gamma == 0.0:
                es.append(None)
                continue
            beta = _beta(shim, s, a, b, prior, _seg_vals(shim, beta0_d[k], g0, g1, cnt), mu)
            if power:
                assert K_d is not None
                beta = shim.clip(beta, tiny, None)
                r = xp.sqrt(beta)
                r = (xp.abs(mu) / r) if snr else (1.0 / r)
                e = _power(xp, r, p) * _seg_vals(shim, K_d[k], g0, g1, cnt)
            else:
                y = _log_part(shim, s, a, b, prior, beta, mu, snr, tiny)
                e = xp.exp(shim.clip(gamma * y + _seg_vals(shim, lk_d[k], g0, g1, cnt), -L, L))
            e = shim.clip(e, lo, hi)
            if any_equal:
                eqv = _seg_vals(shim, eq_d, g0, g1, cnt)
                e = e * (1.0 - eqv) + eqv
            es.append(e)
        if gamma == 0.0:
            one = xp.ones_like(mus[0])
            es = [one] * S
        # Q = prod_k (1 + x_k) - 1, x = e/W: positive terms only (no cancellation).
        xs = es if W == 1.0 else [e * (1.0 / W) for e in es]
        Q = xs[0]
        for x in xs[1:]:
            Q = Q + x + Q * x
        if q_may_overflow:
            Q = shim.clip(Q, None, big)
        Bv = Q / (1.0 + Q)
        if outputs is None:
            # the same arithmetic with or without a summary: the gradient of a
            # diagnostics step is the gradient of any other step
            gp = _weighted_sum(shim, config.weights, es, mus, srcs, Bv, W)
            if summary is not None:
                ws = _weights(shim, config.weights, es, Bv, W)
                summary.add_block(shim, i, es, ws, Bv, 1.0 / (1.0 + Q), W)
        else:
            ws = _weights(shim, config.weights, es, Bv, W)
            gp = None
            for k in range(S):
                shim.store(outputs.e[k, a:b], es[k])
                shim.store(outputs.w[k, a:b], ws[k])
                t = ws[k] * _scaled(mus[k], srcs[k].lam)
                gp = t if gp is None else gp + t
            shim.store(outputs.U[a:b], 1.0 / (1.0 + Q))
        dst = out[a:b]
        if belief:
            _add_seg(shim, bsum, Bv, off, g0, g1)
            if keep_b:
                assert bscratch is not None
                shim.store(bscratch[a:b], Bv)
                shim.store(dst, gp)
            else:
                shim.store(dst, (c_b * Bv) * gp)
        else:
            shim.store(dst, float(S) * gp)

    bsums = _run_blocks(len(plan.blocks), threads, lambda: shim.zeros((G,)), pass_c)
    bsum = bsums[0] if len(bsums) == 1 else sum(bsums[1:]) + bsums[0]

    # ---- pass D: belief scale
    if belief:
        mean_b = shim.to_host(bsum) / lengths
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv = float(S) / (c_b * mean_b)
        if keep_b:
            assert bscratch is not None
            smax = math.inf if config.s_max is None else float(config.s_max)
            with np.errstate(divide="ignore"):
                inv_mean = shim.asarray(1.0 / mean_b)
            for i, (a, b, g0, g1) in enumerate(plan.blocks):
                sv = shim.clip(
                    shim.work(bscratch[a:b]) * _seg_vals(shim, inv_mean, g0, g1, plan.counts[i]),
                    None,
                    smax,
                )
                if outputs is not None:
                    shim.store(bscratch[a:b], sv)
                shim.store(out[a:b], shim.work(out[a:b]) * (float(S) * sv))
        elif G == 1:
            out *= float(inv[0])
        else:
            inv_d = shim.asarray(inv)
            for i, (a, b, g0, g1) in enumerate(plan.blocks):
                if plan.counts[i] is None:
                    out[a:b] *= float(inv[g0])
                else:
                    f = shim.expand(inv_d[g0 : g1 + 1], plan.counts[i])
                    shim.store(out[a:b], shim.work(out[a:b]) * f)
    elif outputs is not None:
        outputs.s[...] = 1.0
    if summary is not None:
        summary.add_gradient(shim, result)
        summary.mean_b = shim.to_host(bsum) / lengths if belief else None
    return result


_POOL: dict[int, ThreadPoolExecutor] = {}


def _run_blocks(n: int, threads: int, make_acc: Any, body: Any) -> list[Any]:
    """``body(i, acc)`` for every block ``i``; returns the accumulators (one per thread)."""
    if threads <= 1 or n < 2 * threads:
        acc = make_acc()
        for i in range(n):
            body(i, acc)
        return [acc]
    pool = _POOL.get(threads)
    if pool is None:
        pool = _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="bogc-block")
    parts = np.array_split(np.arange(n), threads)
    accs = [make_acc() for _ in parts]

    def run(k: int) -> None:
        for i in parts[k].tolist():
            body(i, accs[k])

    list(pool.map(run, range(len(parts))))  # waits for every part; raises what a part raised
    return accs


def _power(xp: Any, r: Any, p: float) -> Any:
    """``r ** p`` for ``p`` in ``{1/2, 1, 2, 4}`` without a transcendental."""
    if p == 1.0:
        return r
    if p == 0.5:
        return xp.sqrt(r)
    e = r * r
    return e if p == 2.0 else e * e


def _masked_var(shim: Shim, n: Any, m2: Any) -> Any:
    """``M2/n`` where ``n >= 2``, else 0 (float64)."""
    xp = shim.xp
    nw, m2w = shim.work(n), shim.work(m2)
    valid = nw >= 2
    return xp.where(valid, m2w / shim.clip(nw, 2.0, None), 0.0 * m2w)


def _score_sums(
    shim: Shim, s: _Src, a: int, b: int, prior: Any, beta: Any, mu: Any, tiny: float,
    sums: Any, cnts: Any, off: Any, g0: int, g1: int,
) -> None:
    """Add one block's sum of finite ``l - C_k`` (``snr``, one count) to ``sums``;
    subtract its number of zero means from ``cnts``.

    ``l - C = 2 log r`` with ``r = |mu| / sqrt(beta)``: one log per score, and
    in a block of one segment whose ratios lie within ``2^-31 .. 2^31`` one log
    per four scores (the log of a product of four, which cannot leave the
    range). A zero mean has ``r = 0`` and is replaced by 1, so it adds nothing
    (its score ``-inf`` takes no part in ``ref``) without a branch. Only ratios
    that are not normal numbers (extreme magnitudes) take the reference's two
    separate logs.
    """
    xp = shim.xp
    zero = mu == 0
    r = xp.abs(mu) / xp.sqrt(shim.clip(beta, tiny, None))
    r1 = r + shim.cast(zero, r)
    lo_r, hi_r = float(xp.min(r1)), float(xp.max(r1))
    if not (lo_r >= tiny and hi_r < math.inf):
        _score_sums_two_logs(shim, s, a, b, prior, beta, mu, tiny, sums, cnts, off, g0, g1)
        return
    if off is None:
        n = r1.shape[0]
        q = n // 4
        if q and lo_r >= 2.0**-31 and hi_r <= 2.0**31:
            prod = r1[:q] * r1[q : 2 * q]
            prod = prod * (r1[2 * q : 3 * q] * r1[3 * q : 4 * q])
            tot = shim.total(xp.log(prod)) + shim.total(xp.log(r1[4 * q :]))
        else:
            tot = shim.total(xp.log(r1))
        nz = shim.count_true(zero)
        sums[g0] += 2.0 * tot
        cnts[g0] -= nz
    else:
        sums[g0 : g1 + 1] += 2.0 * shim.segsum(xp.log(r1), off)
        cnts[g0 : g1 + 1] -= shim.segsum(shim.work(zero), off)


def _score_sums_two_logs(
    shim: Shim, s: _Src, a: int, b: int, prior: Any, beta: Any, mu: Any, tiny: float,
    sums: Any, cnts: Any, off: Any, g0: int, g1: int,
) -> None:
    """As :func:`_score_sums`, with the reference's separate logs (any magnitudes,
    per-dimension counts): ``-inf`` scores are lifted to a floor and taken back out."""
    y = _log_part(shim, s, a, b, prior, beta, mu, True, tiny)
    zero = y == -math.inf  # a zero mean, or beta = inf: no finite score
    y = shim.clip(y, _LFLOOR, None)
    _add_seg(shim, sums, y, off, g0, g1)
    if off is None:
        nz = shim.count_true(zero)
        sums[g0] -= _LFLOOR * nz
        cnts[g0] -= nz
    else:
        nzs = shim.segsum(shim.work(zero), off)
        sums[g0 : g1 + 1] -= _LFLOOR * nzs
        cnts[g0 : g1 + 1] -= nzs


def _segment_totals(shim: Shim, plan: Plan, x: Any) -> np.ndarray:
    """Per-segment sums of the whole ``x`` (host float64), one library call."""
    if plan.G == 1:
        return np.asarray([float(shim.total(x))])
    starts = np.cumsum(plan.lengths) - plan.lengths
    return np.asarray(shim.to_host(shim.segsum(x, shim.index(starts))), dtype=np.float64)


def _accumulate(shim: Shim, plan: Plan, acc: Any, get: Any) -> None:
    for i, (a, b, g0, g1) in enumerate(plan.blocks):
        _add_seg(shim, acc, get(a, b), plan.offsets[i], g0, g1)


def _add_seg(
    shim: Shim, acc: Any, x: Any, off: Any, g0: int, g1: int, scale: float = 1.0
) -> None:
    """``acc[g] += scale * sum of x over segment g``, for the segments g0..g1 of one block."""
    if off is None:
        acc[g0] += scale * shim.total(x)
    else:
        acc[g0 : g1 + 1] += scale * shim.segsum(x, off)


def _seg_vals(shim: Shim, vals: Any, g0: int, g1: int, cnt: Any) -> Any:
    """Per-segment values over one block: a scalar when the block lies in one segment."""
    if cnt is None:
        return float(vals[g0]) if shim.xp is np else vals[g0]
    return shim.expand(vals[g0 : g1 + 1], cnt)


def _mu(shim: Shim, s: _Src, a: int, b: int, prior: Any) -> Any:
    """Posterior mean ``mu_n = (kappa0 mu0 + n m) / (kappa0 + n)`` of a block (float64)."""
    m = shim.work(s.m[a:b])
    if prior.kappa0 == 0:
        return m
    k0, mu0 = float(prior.kappa0), float(prior.mu0)
    n = s.n if isinstance(s.n, float) else shim.work(s.n[a:b])
    return (k0 * mu0 + n * m) / (k0 + n)


def _beta(shim: Shim, s: _Src, a: int, b: int, prior: Any, beta0: Any, mu: Any) -> Any:
    """``beta_n = beta0 + M2/2 + kappa0 n (m - mu0)^2 / (2 kappa_n)`` of a block (float64)."""
    beta = shim.work(s.m2[a:b]) * 0.5 + beta0
    if prior.kappa0 != 0:
        k0, mu0 = float(prior.kappa0), float(prior.mu0)
        n = s.n if isinstance(s.n, float) else shim.work(s.n[a:b])
        d = shim.work(s.m[a:b]) - mu0
        beta = beta + (k0 * n / (2.0 * (k0 + n))) * (d * d)
        if str(s.m.dtype).endswith("float32"):
            # beta rounded to the input dtype as the reference holds it: a
            # (m - mu0)^2 beyond float32 makes beta = inf and the score -inf there.
            beta = shim.work(shim.cast(beta, s.m))
    return beta


def _log_part(
    shim: Shim, s: _Src, a: int, b: int, prior: Any, beta: Any, mu: Any, snr: bool, tiny: float
) -> Any:
    """``l - C_k``: ``-log(beta) [+ 2 log|mu|] [+ count logs]``, ``-inf`` where ``mu = 0``."""
    xp = shim.xp
    y = -xp.log(shim.clip(beta, tiny, None))
    if snr:
        y = y + 2.0 * xp.log(xp.abs(mu))
    if not isinstance(s.n, float):
        n = shim.work(s.n[a:b])
        y = y + xp.log(shim.clip(prior.alpha0 + 0.5 * n, tiny, None))
        y = y + xp.log(shim.clip(prior.kappa0 + n, tiny, None))
    return y


def _scaled(mu: Any, lam: float) -> Any:
    """``lam * mu``, without a pass over the block for the default ``lam = 1``."""
    return mu if lam == 1.0 else lam * mu


def _weights(shim: Shim, kind: str, es: list[Any], Bv: Any, W: float) -> list[Any]:
    """The fused weights ``w_k`` of one block, one array per source (float64)."""
    S = len(es)
    if kind == "uniform" or S == 1:
        return [shim.xp.ones_like(Bv) * (1.0 / S if kind == "uniform" else 1.0)] * S
    if kind == "evidence":
        den = es[0]
        for e in es[1:]:
            den = den + e
        return [e / den for e in es]
    bs, shares = _dempster_shares(es, W)
    return [bs[k] * shares[k] / Bv for k in range(S)]


def _dempster_shares(es: list[Any], W: float) -> tuple[list[Any], list[Any]]:
    """Beliefs ``b_k`` and ``E[1/(1 + M_-k)]`` (Gauss-Legendre, exact; docs/method.md Stage 5)."""
    S = len(es)
    bs = [e / (e + W) for e in es]
    us = [W / (e + W) for e in es]
    nodes, wts = gauss_legendre01((S + 1) // 2)
    shares: list[Any] = [None] * S
    for t, wt in zip(nodes, wts):
        F = [u + bk * t for u, bk in zip(us, bs)]
        P = F[0]
        for f in F[1:]:
            P = P * f
        for k in range(S):
            term = wt * (P / F[k])
            shares[k] = term if shares[k] is None else shares[k] + term
    return bs, shares


def _weighted_sum(
    shim: Shim, kind: str, es: list[Any], mus: list[Any], srcs: list[_Src], Bv: Any, W: float
) -> Any:
    """``g' = sum_k w_k lambda_k mu_k`` for the weight rule ``kind`` (float64)."""
    S = len(es)
    if kind == "uniform" or S == 1:
        acc = _scaled(mus[0], srcs[0].lam)
        for k in range(1, S):
            acc = acc + _scaled(mus[k], srcs[k].lam)
        return acc * (1.0 / S) if kind == "uniform" else acc
    if kind == "evidence":
        num = es[0] * _scaled(mus[0], srcs[0].lam)
        den = es[0]
        for k in range(1, S):
            num = num + es[k] * _scaled(mus[k], srcs[k].lam)
            den = den + es[k]
        return num / den
    # dempster: w_k = b_k E[1/(1 + M_-k)] / B
    bs, shares = _dempster_shares(es, W)
    g: Any = None
    for k in range(S):
        t = bs[k] * shares[k] * (srcs[k].lam * mus[k])
        g = t if g is None else g + t
    return g / Bv
