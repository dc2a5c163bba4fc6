"""Install check: every closed form of METHOD.md on every available array namespace.

Run ``bogc validate`` or ``python -m bogc_core.validate``. Each identity of
METHOD.md ("Closed forms the tests must check", 1-10) plus an end-to-end
comparison of the whole pipeline ("E") is evaluated on every array library
that imports (NumPy, array-api-strict, PyTorch CPU, PyTorch CUDA, JAX, CuPy
when a CUDA device is present). The library is called only through its public
API with arrays of that namespace; the expected values come from an
independent plain Python / NumPy (float64) re-computation written in this
module, with brute force over subsets and power sets where METHOD.md defines a
quantity that way, and ``scipy`` for the Student-t density. Nothing here uses
the library as its own oracle, except for the identities that *are*
relations between calls (commutativity, permutation, scale equivariance).

The result is a table with the largest normalised error
``max|got - want| / max(max|want|, 1)`` (per identity and namespace, over all
its sub-cases) next to the tolerance of the dtype; the exit status is 1 if any
check fails or raises.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

import bogc_core as bc
from bogc_core._types import SCALES, WEIGHTS

__all__ = ["IDENTITIES", "Namespace", "Result", "available_namespaces", "run", "main"]

# Largest normalised error accepted per dtype. float64 results agree with the
# oracle to ~1e-13, float32 to ~1e-6 (the logs and exps cost a few ulps).
TOLERANCE = {"float64": 1e-9, "float32": 5e-5}

# Few distinct shapes and sample counts: JAX compiles every eager operation
# once per shape, so reusing them keeps the JAX column fast.
D = 6
SHAPE2 = (2, 3)
N = (4, 8, 12)


# --------------------------------------------------------------------- namespaces
@dataclass
class Namespace:
    """An array library to validate on: how to make its arrays and read them back.

    ``make(a)`` turns a NumPy float64 array into an array of the namespace in
    ``dtype``; ``to_numpy(x)`` reads one back as NumPy float64; ``context()``
    is entered around the whole column (JAX needs 64-bit mode switched on).
    """

    name: str
    dtype: str
    make: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    array_type: type
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    def __call__(self, a: Any) -> Any:
        return self.make(np.asarray(a, dtype=np.float64))


KNOWN_NAMESPACES = ("numpy", "array_api_strict", "torch", "torch:cuda", "jax.numpy", "cupy")


def _from_dlpack(x: Any) -> np.ndarray:
    try:
        return np.asarray(np.from_dlpack(x), dtype=np.float64)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        return np.asarray(x, dtype=np.float64)


def _numpy(dtype: str) -> Namespace:
    return Namespace(
        "numpy", dtype, lambda a: a.astype(dtype), lambda x: np.asarray(x, np.float64), np.ndarray
    )


def _strict(dtype: str) -> Namespace:
    xs = importlib.import_module("array_api_strict")
    return Namespace(
        "array_api_strict",
        dtype,
        lambda a: xs.asarray(a.astype(dtype), dtype=getattr(xs, dtype)),
        _from_dlpack,
        type(xs.asarray(0.0)),
    )


def _torch(dtype: str, device: str) -> Namespace:
    torch = importlib.import_module("torch")
    tdtype = getattr(torch, dtype)
    return Namespace(
        "torch" if device == "cpu" else f"torch:{device}",
        dtype,
        lambda a: torch.as_tensor(a.copy(), dtype=tdtype, device=device),
        lambda x: x.detach().cpu().numpy().astype(np.float64),
        torch.Tensor,
    )


def _jax(dtype: str) -> Namespace:
    jax = importlib.import_module("jax")
    jnp = importlib.import_module("jax.numpy")

    # 64-bit mode only for the duration of the column, so the caller's JAX
    # configuration is left as it was (jax.enable_x64 is a context manager
    # since JAX 0.5; older releases had it in jax.experimental).
    switch = getattr(jax, "enable_x64", None)
    if switch is None:
        switch = getattr(importlib.import_module("jax.experimental"), "enable_x64", None)
    if dtype == "float64" and switch is None:
        raise RuntimeError("this JAX has no enable_x64 context manager; use --dtype float32")

    def context() -> contextlib.AbstractContextManager[Any]:
        if dtype == "float64" and switch is not None:
            return cast(contextlib.AbstractContextManager[Any], switch(True))
        return contextlib.nullcontext()

    return Namespace(
        "jax.numpy",
        dtype,
        lambda a: jnp.asarray(a, dtype=getattr(jnp, dtype)),
        lambda x: np.asarray(x, dtype=np.float64),
        jax.Array,
        context,
    )


def _cupy(dtype: str) -> Namespace:
    cupy = importlib.import_module("cupy")
    return Namespace(
        "cupy",
        dtype,
        lambda a: cupy.asarray(a.astype(dtype)),
        lambda x: cupy.asnumpy(x).astype(np.float64),
        cupy.ndarray,
    )


def available_namespaces(
    dtype: str = "float64", only: Sequence[str] | None = None
) -> tuple[list[Namespace], dict[str, str]]:
    """Namespaces that import here, and ``{name: reason}`` for those that do not.

    ``only`` restricts the search to these names (``"torch"`` covers
    ``"torch:cuda"``), so that unrequested libraries are not even imported.
    """
    found: list[Namespace] = [_numpy(dtype)] if only is None or "numpy" in only else []
    missing: dict[str, str] = {}

    def attempt(name: str, build: Callable[[], list[Namespace]]) -> None:
        if only is not None and not any(o.split(":")[0] == name for o in only):
            return
        try:
            found.extend(build())
        except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
            missing[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]

    attempt("array_api_strict", lambda: [_strict(dtype)])

    def torch_spaces() -> list[Namespace]:
        torch = importlib.import_module("torch")
        out = [_torch(dtype, "cpu")]
        if torch.cuda.is_available():
            out.append(_torch(dtype, "cuda"))
        return out

    attempt("torch", torch_spaces)
    attempt("jax.numpy", lambda: [_jax(dtype)])

    def cupy_spaces() -> list[Namespace]:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
        return [_cupy(dtype)]

    attempt("cupy", cupy_spaces)
    return found, missing


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


# ------------------------------------------------------------ independent oracle
def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, m, M2)`` of samples ``x[n, *shape]`` by the textbook two-pass formulas."""
    n = np.full(x.shape[1:], float(x.shape[0]))
    m = x.mean(axis=0)
    return n, m, ((x - m) ** 2).sum(axis=0)


def _ng_posterior(
    n: np.ndarray,
    m: np.ndarray,
    m2: np.ndarray,
    mu0: float = 0.0,
    kappa0: float = 0.0,
    alpha0: float = 1.0,
    beta0: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normal-Gamma conjugate update, METHOD.md Stage 1, empirical-Bayes ``beta0`` if None."""
    n = np.broadcast_to(n, m.shape).astype(np.float64)
    if beta0 is None:
        ok = n >= 2
        beta0 = alpha0 * float(np.mean(m2[ok] / n[ok]))
    kappa = kappa0 + n
    mu = (kappa0 * mu0 + n * m) / kappa
    alpha = alpha0 + n / 2.0
    beta = beta0 + m2 / 2.0 + kappa0 * n * (m - mu0) ** 2 / (2.0 * kappa)
    return mu, kappa, alpha, beta


def _dempster_shares(b: np.ndarray) -> np.ndarray:
    """Weights ``w[S, ...]`` by splitting every term of the expanded fused belief.

    Enumerates each non-empty subset ``A`` of sources; the term
    ``prod_{A} b prod_{not A} u`` goes in equal parts to the members of ``A``.
    """
    S = b.shape[0]
    u = 1.0 - b
    share = np.zeros_like(b)
    for r in range(1, S + 1):
        for A in itertools.combinations(range(S), r):
            term = np.ones_like(b[0])
            for j in range(S):
                term = term * (b[j] if j in A else u[j])
            for k in A:
                share[k] += term / r
    return share / (1.0 - np.prod(u, axis=0))


@dataclass
class _Oracle:
    gradient: np.ndarray
    weights: np.ndarray
    uncertainty: np.ndarray
    belief_scale: np.ndarray
    evidence: np.ndarray


def _oracle_calibrate(
    samples: Sequence[np.ndarray], cfg: bc.CalibrationConfig, lambdas: Sequence[float] | None = None
) -> _Oracle:
    """METHOD.md Stages 0-5 written out directly in float64 NumPy."""
    S = len(samples)
    lam = np.ones(S) if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    p = cfg.prior
    mus, taus, m2s = [], [], []
    for x in samples:
        n, m, m2 = _stats(x)
        mu, kappa, alpha, beta = _ng_posterior(n, m, m2, p.mu0, p.kappa0, p.alpha0, p.beta0)
        mus.append(mu)
        taus.append(alpha * kappa / beta)
        m2s.append(m2)
    mu = np.stack(mus)
    tau = np.stack(taus)
    if p.beta0 is None and any(not np.any(v > 0) for v in m2s):
        e = np.ones_like(mu)  # zero pooled variance: equal evidence everywhere
    else:
        tiny = np.finfo(np.float64).tiny
        q = tau * np.maximum(mu**2, tiny) if cfg.evidence_from == "snr" else tau
        ln_q = np.log(q)
        e = np.exp(np.clip(cfg.gamma * (ln_q - ln_q.mean()), -cfg.clip, cfg.clip))
    W = cfg.prior_weight
    b = e / (e + W)
    u = W / (e + W)
    U = np.prod(u, axis=0)
    B = 1.0 - U
    if cfg.weights == "evidence":
        w = e / e.sum(axis=0)
    elif cfg.weights == "uniform":
        w = np.full_like(e, 1.0 / S)
    else:
        w = _dempster_shares(b)
    s = B / B.mean() if cfg.scale == "belief" else np.ones_like(B)
    if cfg.s_max is not None:
        s = np.minimum(s, cfg.s_max)
    lam = lam.reshape((S,) + (1,) * (mu.ndim - 1))
    g = s * S * np.sum(w * lam * mu, axis=0)
    return _Oracle(g, w, U, s, e)


def _dempster_power_set(masses: list[dict[frozenset[int], float]]) -> dict[frozenset[int], float]:
    """Dempster's rule over the full power set, one-shot for any number of sources."""
    combined: dict[frozenset[int], float] = {}
    for focal in itertools.product(*[list(m.items()) for m in masses]):
        inter = frozenset.intersection(*[f for f, _ in focal])
        combined[inter] = combined.get(inter, 0.0) + math.prod(v for _, v in focal)
    conflict = combined.pop(frozenset(), 0.0)
    return {a: v / (1.0 - conflict) for a, v in combined.items()} | {frozenset(): conflict}


def _masses(b: np.ndarray, u: float) -> dict[frozenset[int], float]:
    """Masses on the singletons ``{i}`` and on the frame.

    The frame gets one extra element that carries no singleton mass (the
    complement of the K propositions), so that with K = 1 the frame differs
    from the singleton, as in the one-proposition opinions of METHOD.md; for
    K >= 2 it changes no intersection and hence no combined mass.
    """
    K = len(b)
    m = {frozenset([i]): float(b[i]) for i in range(K)}
    m[frozenset(range(K + 1))] = float(u)
    return m


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
                res = _dempster_power_set([_masses(m[d, :K], m[d, K]) for m in pair])
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
    n, m, m2 = _stats(allx)
    st = [bc.GradientStats.from_samples(ns(c)) for c in chunks]
    ab = st[0].merge(st[1])
    n_ab, m_ab, m2_ab = _stats(np.concatenate(chunks[:2]))
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
    want = _ng_posterior(n, m, m2, 0.5, 2.0, 1.5, 0.8)
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
    n, m, m2 = _stats(x)
    for prior in (bc.NormalGammaPrior(), bc.NormalGammaPrior(0.3, 1.5, 2.0, 0.6)):
        post = bc.posterior(bc.GradientStats.from_samples(ns(x)), prior)
        mu_n, kappa_n, alpha_n, beta_n = _ng_posterior(
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
            n, m, m2 = _stats(x)
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
        want = _oracle_calibrate(samples, cfg)
        err.close(cal.evidence, want.evidence, f"evidence vs oracle, W={W}")
    for S in (3, 4):
        samples = [_noisy_samples(rng, N[1], SHAPE2, noise=0.5 * (k + 1)) for k in range(S)]
        cfg = bc.CalibrationConfig(weights="dempster")
        cal = bc.calibrate([bc.GradientStats.from_samples(ns(x)) for x in samples], cfg)
        e = ns.to_numpy(cal.evidence)
        err.close(cal.weights, _dempster_shares(e / (e + 1.0)), f"subset enumeration, S={S}")


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
    """(E) calibrate() == a direct NumPy transcription of METHOD.md Stages 0-5."""
    for i, cfg in enumerate(_E2E_CONFIGS):
        S = 2 + i % 3
        samples = [_noisy_samples(rng, N[k % 3], SHAPE2, noise=0.5 + k) for k in range(S)]
        lambdas = [1.0 + 0.5 * k for k in range(S)]
        arrays = [ns(x) for x in samples]
        before = [ns.to_numpy(a).copy() for a in arrays]
        cal = bc.calibrate([bc.GradientStats.from_samples(a) for a in arrays], cfg, lambdas)
        want = _oracle_calibrate(samples, cfg, lambdas)
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
    want = _oracle_calibrate(flat, bc.CalibrationConfig())
    got = np.concatenate([ns.to_numpy(c.gradient).reshape(-1) for c in cals])
    err.close(got, want.gradient, "calibrate_tensors scope='global'")


@dataclass(frozen=True)
class Identity:
    """One row of the table: a METHOD.md closed form and its check."""

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
    Identity("E", "pipeline = NumPy transcription of METHOD.md", _check_pipeline),
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
    tol = TOLERANCE[ns.dtype]
    err = _Errors(ns)
    start = time.perf_counter()
    # A fixed stream per identity, so a failure reproduces on its own.
    rng = np.random.default_rng([seed, IDENTITIES.index(ident)])
    try:
        ident.check(ns, rng, err)
    except Exception as exc:  # noqa: BLE001 - any exception is reported as a failed check
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        note = f"{type(exc).__name__}: {exc} (at {tb.filename.split('/')[-1]}:{tb.lineno})"
        return Result(ident.key, ns.name, ns.dtype, "ERROR", math.nan, tol, 0.0, [note])
    status = "ok" if err.worst <= tol else "FAIL"
    notes = err.notes if status != "ok" else []
    return Result(
        ident.key, ns.name, ns.dtype, status, err.worst, tol, time.perf_counter() - start, notes
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bogc validate``; returns 0 if every check passes, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="bogc validate",
        description="Check every closed form of METHOD.md on each available array namespace.",
    )
    parser.add_argument(
        "--namespaces",
        help="comma-separated subset, e.g. numpy,torch (default: every one that imports)",
    )
    parser.add_argument("--dtype", choices=["float64", "float32", "both"], default="float64")
    parser.add_argument("--identities", help="comma-separated keys, e.g. 1,4,E (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    dtypes = ["float64", "float32"] if args.dtype == "both" else [args.dtype]
    wanted = None if not args.namespaces else [s.strip() for s in args.namespaces.split(",")]
    identities = None if not args.identities else [s.strip() for s in args.identities.split(",")]
    if identities:
        unknown = sorted(set(identities) - {i.key for i in IDENTITIES})
        if unknown:
            parser.error(
                f"--identities: unknown keys {unknown}; choose from {[i.key for i in IDENTITIES]}"
            )
    spaces: list[Namespace] = []
    missing: dict[str, str] = {}
    for dt in dtypes:
        found, miss = available_namespaces(dt, wanted)
        spaces.extend(found)
        missing.update(miss)
    if wanted:
        unknown = [w for w in wanted if w not in KNOWN_NAMESPACES]
        if unknown:
            parser.error(f"--namespaces: unknown {unknown}; choose from {list(KNOWN_NAMESPACES)}")
        spaces = [s for s in spaces if s.name in wanted]
        if not spaces:
            print(f"none of {wanted} is available: {missing}", file=sys.stderr)
            return 1

    print(
        f"bogc {bc.__version__}: METHOD.md closed forms on "
        f"{', '.join(dict.fromkeys(s.name for s in spaces))}"
    )
    results: list[Result] = []
    for dt in dtypes:
        results.extend(run([s for s in spaces if s.dtype == dt], identities, dt, args.seed))
    print(format_table(results))
    for name, why in missing.items():
        print(f"not checked: {name} ({why})")
    bad = [r for r in results if not r.passed]
    for r in bad:
        print(
            f"{r.status}: identity {r.identity} on {r.namespace} ({r.dtype}): "
            f"error {r.error:.3g} > {r.tolerance:g}; " + "; ".join(r.notes)
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in results], fh, indent=1, default=str)
    print("all checks passed" if not bad else f"{len(bad)} check(s) failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
