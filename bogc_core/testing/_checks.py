"""The checks behind ``bogc validate``: every closed form of the method
(docs/method.md#identities, 1-10) plus the whole pipeline ("E") on one
:class:`~bogc_core.testing.Namespace`.

The library is called only through its public API with arrays of that
namespace; the expected values come from :mod:`bogc_core.testing` 's float64
oracle (brute force over subsets and power sets where the method defines a
quantity that way) and ``scipy`` for the Student-t density. Nothing uses the
library as its own oracle, except for the identities that *are* relations
between calls (commutativity, permutation, scale equivariance).
"""

from __future__ import annotations

import itertools
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import bogc_core as bc
from bogc_core._types import SCALES, WEIGHTS

from . import _oracle as oracle
from ._namespaces import Namespace, available_backends

__all__ = ["IDENTITIES", "TOLERANCE", "Identity", "Result", "run", "format_table", "available_namespaces"]

# Largest normalised error accepted per dtype. float64 results agree with the
# oracle to ~1e-13, float32 to ~1e-6 (the logs and exps cost a few ulps).
TOLERANCE = {"float64": 1e-9, "float32": 5e-5}

# Few distinct shapes and sample counts: JAX compiles every eager operation
# once per shape, so reusing them keeps the JAX column fast.
D = 6
SHAPE2 = (2, 3)
N = (4, 8, 12)


def available_namespaces(
    dtype: str = "float64", only: Sequence[str] | None = None
) -> tuple[list[Namespace], dict[str, str]]:
    """Namespaces that run here in ``dtype``, and ``{name: reason}`` for those that do not."""
    found, missing = available_backends(None if only is None else list(only))
    return [b.namespace(dtype) for b in found], missing


# ------------------------------------------------------------------ error measure
class _Errors:
    """Collects the largest normalised error over the sub-cases of one identity."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.worst = 0.0
        self.notes: list[str] = []

    def close(self, got: Any, want: Any, what: str = "") -> None:
        g = got if isinstance(got, np.ndarray) else self.ns.to_numpy(got)
        w = np.asarray(want, dtype=np.float64)
        if g.shape != w.shape and g.size != w.size:
            self.fail(f"{what}: shape {g.shape}, expected {w.shape}")
            return
        g = g.reshape(w.shape)
        if not np.all(np.isfinite(g)):
            self.fail(f"{what}: non-finite values")
            return
        denom = max(float(np.max(np.abs(w))) if w.size else 0.0, 1.0)
        err = float(np.max(np.abs(g - w))) / denom if w.size else 0.0
        if err > self.worst:
            self.worst = err
            if what:
                self.notes = [f"largest error in: {what}"]

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            self.fail(what)

    def fail(self, what: str) -> None:
        self.worst = math.inf
        self.notes.append(what)

    def check_type(self, x: Any, what: str) -> None:
        if not isinstance(x, self.ns.array_type):
            self.fail(f"{what}: returned {type(x).__name__}, not an array of {self.ns.name}")


def _random_opinion(rng: np.random.Generator, shape: tuple[int, ...], K: int) -> np.ndarray:
    """Masses ``[..., K + 1]`` (K singletons then the frame), kept away from total conflict."""
    return rng.dirichlet(np.ones(K + 1) * 1.5, size=shape)


def _noisy_samples(
    rng: np.random.Generator, n: int, shape: tuple[int, ...], noise: float = 1.0
) -> np.ndarray:
    """Gradient samples whose mean and spread differ between dimensions."""
    mean = rng.normal(size=shape)
    spread = noise * np.exp(rng.normal(scale=0.7, size=shape))
    return mean + spread * rng.normal(size=(n,) + shape)


# ------------------------------------------------------------------- identities
def _check_power_set(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(1) reduced rule == Dempster over the full power set, K = 1..4; 3-way fold too."""
    dims = D
    for K in (1, 2, 3, 4):
        ms = [_random_opinion(rng, (dims,), K) for _ in range(3)]
        ops = [bc.Opinion(ns(m[:, :K]), ns(m[:, K])) for m in ms]
        fused, conflict = bc.reduced_dempster(ops[0], ops[1])
        folded, total_conflict = bc.combine(ops)
        err.check_type(fused.belief, "reduced_dempster belief")
        for pair, got, got_c in ((ms[:2], fused, conflict), (ms, folded, total_conflict)):
            want_b = np.zeros((dims, K))
            want_u = np.zeros(dims)
            want_c = np.zeros(dims)
            for d in range(dims):
                res = oracle.dempster_power_set([oracle.masses(m[d, :K], m[d, K]) for m in pair])
                frame = frozenset(range(K + 1))
                for i in range(K):
                    want_b[d, i] = res.get(frozenset([i]), 0.0)
                want_u[d] = res.get(frame, 0.0)
                want_c[d] = res[frozenset()]
                other = [a for a in res if a and len(a) != 1 and a != frame]
                err.require(not other, "power-set oracle produced mass off singletons/frame")
            tag = f"K={K}, {len(pair)} sources"
            err.close(got.belief, want_b, f"belief, {tag}")
            err.close(got.uncertainty, want_u, f"uncertainty, {tag}")
            err.close(got_c, want_c, f"conflict, {tag}")


def _check_single(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(2) K = 1 closed forms and the vacuous opinion as identity."""
    e = np.exp(rng.normal(scale=2.0, size=(3, D)))
    for W in (1.0, 2.5):
        b, u = bc.fuse_single(ns(e), W)
        want_u = np.prod(W / (e + W), axis=0)
        err.close(u, want_u, f"fuse_single u, W={W}")
        err.close(b, 1.0 - want_u, f"fuse_single b, W={W}")
        folded, _ = bc.combine([bc.Opinion.from_evidence(ns(ek), W) for ek in e])
        err.close(folded.uncertainty, want_u, f"combine of from_evidence, W={W}")
        if W == 1.0:
            fused_e = ns.to_numpy(b) / ns.to_numpy(u)
            want_e = np.prod(1.0 + e, axis=0) - 1.0
            err.close(fused_e / want_e, np.ones_like(want_e), "fused evidence prod(1+e)-1")
    for K in (1, 2, 4):
        m = _random_opinion(rng, (D,), K)
        op = bc.Opinion(ns(m[:, :K]), ns(m[:, K]))
        vac = bc.Opinion.vacuous((D,), K=K, like=op.uncertainty)
        for a, c in ((op, vac), (vac, op)):
            out, conflict = bc.reduced_dempster(a, c)
            err.close(out.belief, m[:, :K], f"vacuous identity belief, K={K}")
            err.close(out.uncertainty, m[:, K], f"vacuous identity uncertainty, K={K}")
            err.close(conflict, np.zeros(D), f"vacuous identity conflict, K={K}")


def _check_commutative(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(3) the fold is commutative and associative; permuting sources changes nothing."""
    for K in (1, 3):
        ms = [_random_opinion(rng, (D,), K) for _ in range(3)]
        a, b, c = (bc.Opinion(ns(m[:, :K]), ns(m[:, K])) for m in ms)
        ab, _ = bc.reduced_dempster(a, b)
        ba, _ = bc.reduced_dempster(b, a)
        err.close(ab.belief, ns.to_numpy(ba.belief), f"a+b vs b+a belief, K={K}")
        err.close(ab.uncertainty, ns.to_numpy(ba.uncertainty), f"a+b vs b+a uncertainty, K={K}")
        left, _ = bc.reduced_dempster(ab, c)
        bc_, _ = bc.reduced_dempster(b, c)
        right, _ = bc.reduced_dempster(a, bc_)
        err.close(left.belief, ns.to_numpy(right.belief), f"(a+b)+c vs a+(b+c), K={K}")
        err.close(left.uncertainty, ns.to_numpy(right.uncertainty), f"(a+b)+c vs a+(b+c) u, K={K}")
    samples = [_noisy_samples(rng, N[1], SHAPE2, noise=s) for s in (0.5, 1.0, 2.0)]
    for weights in ("evidence", "dempster"):
        cfg = bc.CalibrationConfig(weights=weights)
        stats = [bc.GradientStats.from_samples(ns(x)) for x in samples]
        base = bc.calibrate(stats, cfg)
        for perm in ((2, 0, 1), (1, 0, 2)):
            cal = bc.calibrate([stats[i] for i in perm], cfg)
            err.close(cal.gradient, ns.to_numpy(base.gradient), f"gradient under {perm}, {weights}")
            err.close(
                cal.weights,
                ns.to_numpy(base.weights)[list(perm)],
                f"weights permuted by {perm}, {weights}",
            )
        named = bc.calibrate({"c": stats[2], "a": stats[0], "b": stats[1]}, cfg)
        err.close(named.gradient, ns.to_numpy(base.gradient), f"mapping input, {weights}")


def _check_merge(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(4) merge == statistics of the concatenation; rho = 1 streaming == batch posterior."""
    shape = SHAPE2
    chunks = [_noisy_samples(rng, n, shape) + 3.0 for n in N]
    allx = np.concatenate(chunks)
    n, m, m2 = oracle.sample_stats(allx)
    st = [bc.GradientStats.from_samples(ns(c)) for c in chunks]
    ab = st[0].merge(st[1])
    n_ab, m_ab, m2_ab = oracle.sample_stats(np.concatenate(chunks[:2]))
    err.close(ab.mean, m_ab, "merge mean")
    err.close(ab.m2, m2_ab, "merge m2")
    err.close(ab.count, n_ab[0, 0], "merge count")
    ba = st[1].merge(st[0])
    err.close(ba.m2, m2_ab, "merge is order-free (b.merge(a))")
    run = st[0]
    for s in st[1:]:
        run = run.decay(1.0).merge(s)
    err.close(run.mean, m, "rho=1 streaming mean")
    err.close(run.m2, m2, "rho=1 streaming m2")
    # rho in (0, 1): the old samples count with weight rho (weighted statistics).
    rho = 0.3
    wts = np.concatenate([np.full(len(chunks[0]), rho), np.ones(len(chunks[1]))])
    x01 = np.concatenate(chunks[:2])
    wm = np.tensordot(wts, x01, axes=1) / wts.sum()
    wm2 = np.tensordot(wts, (x01 - wm) ** 2, axes=1)
    dec = st[0].decay(rho).merge(st[1])
    err.close(dec.mean, wm, f"decay({rho}) then merge: weighted mean")
    err.close(dec.m2, wm2, f"decay({rho}) then merge: weighted m2")
    newest = st[0].decay(0.0).merge(st[1])
    err.close(newest.mean, chunks[1].mean(axis=0), "rho=0 keeps only the newest")
    # Sums form, both directions.
    total, total_sq = allx.sum(axis=0), (allx**2).sum(axis=0)
    fs = bc.GradientStats.from_sums(ns(n), ns(total), ns(total_sq))
    err.close(fs.mean, m, "from_sums mean")
    err.close(fs.m2, m2, "from_sums m2")
    shift = m.round(1)
    fs2 = bc.GradientStats.from_sums(
        ns(n), ns((allx - shift).sum(axis=0)), ns(((allx - shift) ** 2).sum(axis=0)), ns(shift)
    )
    err.close(fs2.m2, m2, "from_sums m2 with shift")
    cnt, tot, tot_sq = bc.GradientStats.from_samples(ns(allx)).to_sums()
    err.close(tot, total, "to_sums total")
    err.close(tot_sq, total_sq, "to_sums total_sq")
    # Conjugacy: batch posterior, streaming posterior, and posterior-as-prior.
    prior = bc.NormalGammaPrior(mu0=0.5, kappa0=2.0, alpha0=1.5, beta0=0.8)
    want = oracle.posterior(n, m, m2, 0.5, 2.0, 1.5, 0.8)
    for label, stats in (("batch", bc.GradientStats.from_samples(ns(allx))), ("streamed", run)):
        post = bc.posterior(stats, prior)
        for name, got, w in zip(("mu", "kappa", "alpha", "beta"), _fields(post), want, strict=True):
            err.close(np.broadcast_to(ns.to_numpy(got), shape), w, f"{label} posterior {name}")
    first = bc.posterior(st[0], prior)
    rest = np.concatenate(chunks[1:])
    f_mu, f_kappa, f_alpha, f_beta = (
        np.broadcast_to(ns.to_numpy(v), shape) for v in _fields(first)
    )
    for d in [(0, 0), (1, 1), (1, 2)]:
        step = bc.NormalGammaPrior(
            float(f_mu[d]), float(f_kappa[d]), float(f_alpha[d]), float(f_beta[d])
        )
        post = bc.posterior(bc.GradientStats.from_samples(ns(rest[:, d[0], d[1]][:, None])), step)
        got = [float(np.ravel(ns.to_numpy(v))[0]) for v in _fields(post)]
        err.close(np.array(got), np.array([w[d] for w in want]), f"posterior as prior, dim {d}")


def _fields(post: bc.Posterior) -> tuple[Any, Any, Any, Any]:
    return post.mu, post.kappa, post.alpha, post.beta


def _ng_joint(lam: float, v: float, mu: float, kappa: float, alpha: float, beta: float) -> float:
    """``N(v | mu, 1/(kappa lam)) * Gamma(lam | alpha, rate=beta)``, the Normal-Gamma density."""
    prec = kappa * lam
    log_gamma = (
        alpha * math.log(beta) - math.lgamma(alpha) + (alpha - 1.0) * math.log(lam) - beta * lam
    )
    normal = math.sqrt(prec / (2.0 * math.pi)) * math.exp(-0.5 * prec * (v - mu) ** 2)
    return normal * math.exp(log_gamma)


def _check_student_t(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(5) the marginal of mu from the Normal-Gamma is the Student-t the posterior reports."""
    from scipy import integrate, stats

    x = _noisy_samples(rng, N[1], (D,))
    n, m, m2 = oracle.sample_stats(x)
    for prior in (bc.NormalGammaPrior(), bc.NormalGammaPrior(0.3, 1.5, 2.0, 0.6)):
        post = bc.posterior(bc.GradientStats.from_samples(ns(x)), prior)
        mu_n, kappa_n, alpha_n, beta_n = oracle.posterior(
            n, m, m2, prior.mu0, prior.kappa0, prior.alpha0, prior.beta0
        )
        loc = ns.to_numpy(post.mu)
        scale = np.broadcast_to(ns.to_numpy(post.scale()), loc.shape)
        df = np.broadcast_to(ns.to_numpy(post.df()), loc.shape)
        tau = np.broadcast_to(ns.to_numpy(post.precision()), loc.shape)
        err.close(tau, alpha_n * kappa_n / beta_n, "precision tau = alpha*kappa/beta")
        err.close(tau * scale**2, np.ones_like(tau), "tau = 1/scale^2")
        for d in range(loc.shape[0]):
            sd = math.sqrt(beta_n[d] / (alpha_n[d] * kappa_n[d]))
            pts = mu_n[d] + sd * np.array([-3.0, -1.0, -0.2, 0.0, 0.7, 2.5])
            params = (float(mu_n[d]), float(kappa_n[d]), float(alpha_n[d]), float(beta_n[d]))

            marginal = np.array(
                [
                    integrate.quad(
                        _ng_joint, 0.0, np.inf, args=(v, *params), epsabs=0, epsrel=1e-11
                    )[0]
                    for v in pts
                ]
            )
            t_pdf = stats.t.pdf(pts, df=df[d], loc=loc[d], scale=scale[d])
            err.close(t_pdf / marginal, np.ones_like(marginal), f"t density vs integral, dim {d}")


def _check_inverse_variance(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(6) precision evidence, gamma = 1, alpha0 -> 0, beta0 = 0: inverse-variance combination."""
    samples = [
        _noisy_samples(rng, n, SHAPE2, noise=s) for n, s in zip(N, (0.5, 1.0, 2.0), strict=True)
    ]
    for alpha0 in (0.0, 1e-12):
        cfg = bc.CalibrationConfig(
            gamma=1.0,
            evidence_from="precision",
            prior=bc.NormalGammaPrior(alpha0=alpha0, beta0=0.0),
            scale="none",
            weights="evidence",
        )
        cal = bc.calibrate([bc.GradientStats.from_samples(ns(x)) for x in samples], cfg)
        err.check_type(cal.gradient, "calibrate gradient")
        # Each mean has variance sigma^2 / n, estimated as (M2/n) / n: tau = n^2 / M2.
        taus, means = [], []
        for x in samples:
            n, m, m2 = oracle.sample_stats(x)
            taus.append(n * n / m2)
            means.append(m)
        tau, mean = np.stack(taus), np.stack(means)
        want = len(samples) * np.sum(tau * mean, axis=0) / np.sum(tau, axis=0)
        err.close(cal.gradient, want, f"S * sum tau m / sum tau, alpha0={alpha0}")


def _check_scale_equivariance(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(7) multiplying every source's samples by c > 0 multiplies g_hat by c."""
    samples = [_noisy_samples(rng, N[1], SHAPE2, noise=s) for s in (0.3, 1.0, 3.0)]
    for cfg in (
        bc.CalibrationConfig(),
        bc.CalibrationConfig(weights="dempster", evidence_from="precision"),
    ):
        base = ns.to_numpy(
            bc.calibrate([bc.GradientStats.from_samples(ns(x)) for x in samples], cfg).gradient
        )
        for c in (1e-3, 7.5, 1e4):
            cal = bc.calibrate([bc.GradientStats.from_samples(ns(c * x)) for x in samples], cfg)
            err.close(
                ns.to_numpy(cal.gradient) / c, base, f"c={c}, {cfg.weights}/{cfg.evidence_from}"
            )


def _check_equal_stats(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(8) equal statistics for all sources and dimensions: g_hat = sum_k lambda_k m_k."""
    shape = SHAPE2
    for weights, scale in itertools.product(WEIGHTS, SCALES):
        cfg = bc.CalibrationConfig(weights=weights, scale=scale)  # type: ignore[arg-type]
        st = bc.GradientStats(ns(np.array(10.0)), ns(np.full(shape, -0.7)), ns(np.full(shape, 3.2)))
        cal = bc.calibrate([st, st, st], cfg)
        err.close(cal.gradient, np.full(shape, -2.1), f"sum of means, {weights}/{scale}")
        cal = bc.calibrate([st, st], cfg, source_weights=[0.25, 2.0])
        err.close(cal.gradient, np.full(shape, -0.7 * 2.25), f"with lambdas, {weights}/{scale}")
    # Deterministic gradients (pooled variance exactly 0): equal evidence, plain sum.
    means = rng.normal(size=(3,) + shape)
    zero = [bc.GradientStats(ns(np.array(4.0)), ns(mk), ns(np.zeros(shape))) for mk in means]
    cal = bc.calibrate(zero)
    err.close(cal.gradient, means.sum(axis=0), "zero-variance group: plain sum")
    err.require(bool(cal.diagnostics.get("zero_variance")), "zero-variance flag in diagnostics")


def _check_dempster_two(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(9) two-source Dempster attribution formula; subset enumeration for S = 3, 4."""
    for W in (1.0, 2.0):
        samples = [_noisy_samples(rng, N[1], SHAPE2, noise=s) for s in (0.5, 2.0)]
        cfg = bc.CalibrationConfig(weights="dempster", prior_weight=W)
        cal = bc.calibrate([bc.GradientStats.from_samples(ns(x)) for x in samples], cfg)
        e = ns.to_numpy(cal.evidence)
        b, u = e / (e + W), W / (e + W)
        w1 = (b[0] * u[1] + b[0] * b[1] / 2.0) / (1.0 - u[0] * u[1])
        err.close(cal.weights, np.stack([w1, 1.0 - w1]), f"two-source formula, W={W}")
        want = oracle.calibrate_samples(samples, cfg)
        err.close(cal.evidence, want.evidence, f"evidence vs oracle, W={W}")
    for S in (3, 4):
        samples = [_noisy_samples(rng, N[1], SHAPE2, noise=0.5 * (k + 1)) for k in range(S)]
        cfg = bc.CalibrationConfig(weights="dempster")
        cal = bc.calibrate([bc.GradientStats.from_samples(ns(x)) for x in samples], cfg)
        e = ns.to_numpy(cal.evidence)
        err.close(cal.weights, oracle.dempster_shares_bruteforce(e / (e + 1.0)), f"subset enumeration, S={S}")


def _check_snr_invariance(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(10) snr: rescaling one source leaves e, w, b unchanged and scales its term by c."""
    samples = [_noisy_samples(rng, N[1], SHAPE2, noise=s) for s in (0.5, 1.0, 2.0)]
    lambdas = [1.0, 0.5, 2.0]
    for weights in ("evidence", "dempster"):
        cfg = bc.CalibrationConfig(weights=weights)
        base = bc.calibrate([bc.GradientStats.from_samples(ns(x)) for x in samples], cfg, lambdas)
        e0, w0 = ns.to_numpy(base.evidence), ns.to_numpy(base.weights)
        s0, g0 = ns.to_numpy(base.belief_scale), ns.to_numpy(base.gradient)
        for j, c in ((0, 40.0), (2, 0.01)):
            scaled = [c * x if k == j else x for k, x in enumerate(samples)]
            cal = bc.calibrate([bc.GradientStats.from_samples(ns(x)) for x in scaled], cfg, lambdas)
            tag = f"source {j} x{c}, {weights}"
            err.close(ns.to_numpy(cal.evidence) / e0, np.ones_like(e0), f"evidence, {tag}")
            err.close(cal.weights, w0, f"weights, {tag}")
            err.close(cal.uncertainty, ns.to_numpy(base.uncertainty), f"fused uncertainty, {tag}")
            err.close(cal.belief_scale, s0, f"belief scale, {tag}")
            term = s0 * len(samples) * w0[j] * lambdas[j] * samples[j].mean(axis=0)
            err.close(cal.gradient, g0 + (c - 1.0) * term, f"gradient, {tag}")


_E2E_CONFIGS = [
    bc.CalibrationConfig(),
    bc.CalibrationConfig(evidence_from="precision", gamma=1.0),
    bc.CalibrationConfig(weights="dempster", prior_weight=2.0),
    bc.CalibrationConfig(weights="uniform", scale="none"),
    bc.CalibrationConfig(s_max=1.2, gamma=2.0),
    bc.CalibrationConfig(prior=bc.NormalGammaPrior(mu0=0.1, kappa0=3.0, alpha0=2.0, beta0=0.5)),
    bc.CalibrationConfig(clip=1.0),
]


def _check_pipeline(ns: Namespace, rng: np.random.Generator, err: _Errors) -> None:
    """(E) calibrate() == a direct NumPy transcription of docs/method.md Stages 0-5."""
    for i, cfg in enumerate(_E2E_CONFIGS):
        S = 2 + i % 3
        samples = [_noisy_samples(rng, N[k % 3], SHAPE2, noise=0.5 + k) for k in range(S)]
        lambdas = [1.0 + 0.5 * k for k in range(S)]
        arrays = [ns(x) for x in samples]
        before = [ns.to_numpy(a).copy() for a in arrays]
        cal = bc.calibrate([bc.GradientStats.from_samples(a) for a in arrays], cfg, lambdas)
        want = oracle.calibrate_samples(samples, cfg, lambdas)
        tag = f"config {i}"
        for attr in ("gradient", "weights", "uncertainty", "belief_scale", "evidence"):
            got = getattr(cal, attr)
            err.check_type(got, f"Calibration.{attr}")
            err.close(got, getattr(want, attr), f"{attr}, {tag}")
        for a, b in zip(arrays, before, strict=True):
            err.require(bool(np.array_equal(ns.to_numpy(a), b)), f"input mutated, {tag}")
    # scope="global": several tensors pooled into one group.
    shapes = [SHAPE2, (D,)]
    per_tensor = [[_noisy_samples(rng, N[1], sh, noise=0.5 + k) for k in range(2)] for sh in shapes]
    cals = bc.calibrate_tensors(
        [
            {"a": bc.GradientStats.from_samples(ns(xa)), "b": bc.GradientStats.from_samples(ns(xb))}
            for xa, xb in per_tensor
        ],
        bc.CalibrationConfig(scope="global"),
    )
    flat = [np.concatenate([t[k].reshape(N[1], -1) for t in per_tensor], axis=1) for k in range(2)]
    want = oracle.calibrate_samples(flat, bc.CalibrationConfig())
    got = np.concatenate([ns.to_numpy(c.gradient).reshape(-1) for c in cals])
    err.close(got, want.gradient, "calibrate_tensors scope='global'")


@dataclass(frozen=True)
class Identity:
    """One row of the table: a docs/method.md closed form and its check."""

    key: str
    title: str
    check: Callable[[Namespace, np.random.Generator, _Errors], None]


IDENTITIES: list[Identity] = [
    Identity("1", "reduced rule = Dempster over power set (K<=4)", _check_power_set),
    Identity("2", "K=1: u=prod u_k, e=prod(1+e_k)-1, vacuous", _check_single),
    Identity("3", "commutative, associative, permutation", _check_commutative),
    Identity("4", "merge = concatenation, rho=1 = batch posterior", _check_merge),
    Identity("5", "Student-t marginal of the Normal-Gamma", _check_student_t),
    Identity("6", "precision/gamma=1: inverse-variance combination", _check_inverse_variance),
    Identity("7", "scale equivariance g(c x) = c g(x)", _check_scale_equivariance),
    Identity("8", "equal statistics: g = sum_k lambda_k m_k", _check_equal_stats),
    Identity("9", "two-source Dempster attribution", _check_dempster_two),
    Identity("10", "snr: one source x c scales only its term", _check_snr_invariance),
    Identity("E", "pipeline = NumPy transcription of docs/method.md", _check_pipeline),
]


# ------------------------------------------------------------------------ runner
@dataclass
class Result:
    """Outcome of one identity on one namespace."""

    identity: str
    namespace: str
    dtype: str
    status: str  # "ok", "FAIL" or "ERROR"
    error: float
    tolerance: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def _run_one(ident: Identity, ns: Namespace, seed: int) -> Result:
    tol = TOLERANCE[ns.dtype_name]
    err = _Errors(ns)
    start = time.perf_counter()
    # A fixed stream per identity, so a failure reproduces on its own.
    rng = np.random.default_rng([seed, IDENTITIES.index(ident)])
    try:
        ident.check(ns, rng, err)
    except Exception as exc:  # noqa: BLE001 - any exception is reported as a failed check
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        note = f"{type(exc).__name__}: {exc} (at {tb.filename.split('/')[-1]}:{tb.lineno})"
        return Result(ident.key, ns.name, ns.dtype_name, "ERROR", math.nan, tol, 0.0, [note])
    status = "ok" if err.worst <= tol else "FAIL"
    notes = err.notes if status != "ok" else []
    return Result(
        ident.key, ns.name, ns.dtype_name, status, err.worst, tol, time.perf_counter() - start, notes
    )


def run(
    namespaces: Sequence[Namespace] | None = None,
    identities: Sequence[str] | None = None,
    dtype: str = "float64",
    seed: int = 0,
) -> list[Result]:
    """Evaluate ``identities`` (keys, default all) on ``namespaces`` (default: all available)."""
    spaces = list(namespaces) if namespaces is not None else available_namespaces(dtype)[0]
    chosen = [i for i in IDENTITIES if identities is None or i.key in identities]
    results: list[Result] = []
    for ns in spaces:
        with ns.context():
            results.extend(_run_one(ident, ns, seed) for ident in chosen)
    return results


def format_table(results: Sequence[Result]) -> str:
    """Identities as rows, namespaces as columns: ``ok``/``FAIL``/``ERROR`` and the error."""
    cols = list(dict.fromkeys(f"{r.namespace} ({r.dtype})" for r in results))
    by = {(r.identity, f"{r.namespace} ({r.dtype})"): r for r in results}
    keys = list(dict.fromkeys(r.identity for r in results))
    titles = {i.key: f"{i.key:>2} {i.title}" for i in IDENTITIES}
    width = max(len(titles[k]) for k in keys)
    colw = [max(len(c), 14) for c in cols]
    lines = ["  ".join([" " * width] + [c.ljust(w) for c, w in zip(cols, colw, strict=True)])]
    for k in keys:
        cells = []
        for c, w in zip(cols, colw, strict=True):
            r = by.get((k, c))
            cell = "-" if r is None else f"{r.status} {r.error:.1e}"
            cells.append(cell.ljust(w))
        lines.append("  ".join([titles[k].ljust(width)] + cells))
    tols = sorted({(r.dtype, r.tolerance) for r in results})
    lines.append(
        "tolerance (largest normalised error): " + ", ".join(f"{d} {t:g}" for d, t in tols)
    )
    return "\n".join(lines)
