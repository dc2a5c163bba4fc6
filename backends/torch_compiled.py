"""Opt-in ``torch.compile``d fused path (``CalibrationConfig(backend="torch-compiled")``).

The pipeline of :func:`bogc_core.calibrate.reference_calibrate` as a few
compiled stages, each one Inductor loop over the ``D`` dimensions:

A. (empirical-Bayes prior only, eager) ``sum_d M2_kd`` per source (masked by
   ``n >= 2`` for per-dimension counts): ``beta0_k`` and the zero-variance test.
B. Log scores, written into the evidence output, and the sum and number of
   the finite ones: ``ref``.
C. Evidence (in place of the scores), fused belief and uncertainty, weights
   and the unscaled gradient ``g' = sum_k w_k lambda_k mu_k``; writes
   ``e, w, U, B, g'`` and sums ``B``.
D. In place: ``s = B / mean(B)`` (clipped at ``s_max``) and ``g = S * s * g'``.

Outputs are preallocated (huge pages on the CPU, as in :mod:`.torch_fused`)
and passed row by row, so Inductor stores straight into them and no
``D``-sized temporary is created.

Every value option is passed as a tensor, so one compilation (dynamic in
``D``) serves all sizes and values; the compiled stages are cached per
(static options, ``S``, dtype). The fused belief uses the transcendental-free
form of :mod:`._blocked` (``Q = prod(1 + e/W) - 1``, ``U = 1/(1+Q)``,
``B = Q U``). ``weights="dempster"`` declines (the reference runs), as does
any failure of ``torch.compile``: the user's call never fails because of it.
``backend="auto"`` never picks this path (``torch-fused`` comes first).

``calibrate_gradient`` runs the same compiled stages and returns the
gradient (copied into ``out`` when given); it is not a separate
gradient-only compilation, so it writes the full result's buffers.
"""

from __future__ import annotations

import itertools
import math
import types
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import torch

from bogc_core._types import Calibration, CalibrationConfig, Decline

from ._blocked import decline_reason, hugepage_buffer
from .numpy_fused import check_gradient_call

__all__ = ["NAME", "accepts", "calibrate", "calibrate_gradient", "compiled_stages"]

NAME = "torch-compiled"

# params vector layout (dtype of the input)
_MU0, _K0, _A0, _GAMMA, _L, _W, _SMAX, _TINY, _BIG, _EQ, _S = range(11)
_NPARAM = 11


def _score(m, m2, n, beta0, c, p, opts):
    """Log score ``l`` of one source (``-inf`` where ``mu == 0`` under "snr") and ``mu``."""
    snr, kappa0_zero = opts[0], opts[1]
    tiny = p[_TINY]
    if kappa0_zero:
        mu = m
        beta = beta0 + 0.5 * m2
    else:
        k0, mu0 = p[_K0], p[_MU0]
        kappa = k0 + n
        d = m - mu0
        mu = (k0 * mu0 + n * m) / kappa
        beta = beta0 + 0.5 * m2 + (k0 * n / (2.0 * kappa)) * (d * d)
    l = c - torch.log(torch.clamp(beta, min=tiny))
    if n.dim() > 0:  # per-dimension counts: log(alpha) + log(kappa) per element
        l = (
            l
            + torch.log(torch.clamp(p[_A0] + 0.5 * n, min=tiny))
            + torch.log(torch.clamp(p[_K0] + n, min=tiny))
        )
    if snr:
        a = torch.abs(mu)
        zero = a == 0
        l = torch.where(zero, -math.inf, l + 2.0 * torch.log(torch.where(zero, 1.0, a)))
    return l, mu


def _stage_ref(ms, m2s, ns, beta0, c, p, opts, Es):
    """Write the log scores into the evidence rows ``Es``; sum and count the finite ones."""
    total = torch.zeros((), dtype=p.dtype, device=p.device)
    count = torch.zeros((), dtype=p.dtype, device=p.device)
    for k in range(len(ms)):
        l, _ = _score(ms[k], m2s[k], ns[k], beta0[k], c[k], p, opts)
        Es[k].copy_(l)
        fin = torch.isfinite(l)
        total = total + torch.where(fin, l, 0.0).sum()
        count = count + fin.to(p.dtype).sum()
    return total, count


def _stage_main(ms, ns, lam, ref, p, opts, Es, Ws, U, B, G):
    """Scores -> evidence, weights, ``U``, ``B``, ``g'`` into the outputs; returns sum(B).

    ``Es``/``Ws`` are the rows of the ``(S, D)`` outputs, passed one by one so
    every store is in the one loop over ``D`` (no ``(S, D)`` temporary).
    """
    weights, want_sum = opts[2], opts[3]
    S = len(ms)
    L, W, gamma = p[_L], p[_W], p[_GAMMA]
    es, mus = [], []
    for k in range(S):
        l = Es[k]  # the score left by _stage_ref (unset, and unused, with p[_EQ])
        if opts[1]:
            mu = ms[k]
        else:
            k0, n = p[_K0], ns[k]
            mu = (k0 * p[_MU0] + n * ms[k]) / (k0 + n)
        z = torch.where(torch.isfinite(l), gamma * (l - ref), -L)
        e = torch.exp(torch.clamp(z, min=-L, max=L))
        e = torch.where(p[_EQ] > 0, 1.0, e)
        es.append(e)
        mus.append(mu)
    xs = [e / W for e in es]
    q = xs[0]
    for x in xs[1:]:
        q = q + x + q * x
    q = torch.clamp(q, max=p[_BIG])
    u = 1.0 / (1.0 + q)
    b = q * u
    if weights == "uniform":
        ws = [torch.full_like(es[0], 1.0 / S) for _ in range(S)]
    else:
        tot = es[0]
        for e in es[1:]:
            tot = tot + e
        ws = [e / tot for e in es]
    g = ws[0] * lam[0] * mus[0]
    for k in range(1, S):
        g = g + ws[k] * lam[k] * mus[k]
    for k in range(S):
        Es[k].copy_(es[k])
        Ws[k].copy_(ws[k])
    U.copy_(u)
    B.copy_(b)
    G.copy_(g)
    return b.sum() if want_sum else torch.zeros((), dtype=p.dtype, device=p.device)


def _stage_scale(B, G, mean_b, p):
    """In place: ``B <- s = min(B / mean_b, s_max)``, ``G <- S * s * G``."""
    s = torch.clamp(B / mean_b, max=p[_SMAX])
    G.copy_(G * (p[_S] * s))
    B.copy_(s)


def _fresh(fn: Any, tag: str) -> Any:
    """``fn`` with its own code object, so each cached variant has its own Dynamo cache."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


# Keep every intermediate inline (one loop, CSE'd) instead of materialising
# D-sized temporaries, which would cost fresh-page faults on every call.
_INDUCTOR_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"realize_reads_threshold": 1000, "realize_opcount_threshold": 100000}

_CACHE: dict[tuple, dict[str, Any]] = {}
_BROKEN: dict[tuple, str] = {}


def compiled_stages(opts: tuple, S: int, dtype: torch.dtype) -> dict[str, Any]:
    """The compiled stages for ``(opts, S, dtype)`` (built once, compiled on first call)."""
    key = (opts, S, dtype)
    if key not in _CACHE:
        tag = "_".join(str(x) for x in (*opts, S, str(dtype).split(".")[-1]))
        tag = "".join(ch if ch.isalnum() else "_" for ch in tag)
        _CACHE[key] = {
            name: torch.compile(_fresh(fn, tag), dynamic=True, options=_INDUCTOR_OPTIONS)
            for name, fn in (("ref", _stage_ref), ("main", _stage_main), ("scale", _stage_scale))
        }
    return _CACHE[key]


def _empty_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Any:
    """A fresh output buffer (huge pages on the CPU, as in :mod:`.torch_fused`)."""
    if device.type == "cpu":
        n = math.prod(shape)
        mm = hugepage_buffer(n * torch.empty((), dtype=dtype).element_size())
        if mm is not None:
            return torch.frombuffer(mm, dtype=dtype, count=n).reshape(shape)
    return torch.empty(shape, dtype=dtype, device=device)


def accepts(space: Any) -> bool:
    return bool(array_api_compat.is_torch_namespace(space.xp))


def _eb_beta0(m2: torch.Tensor, n: torch.Tensor, alpha0: float) -> tuple[float, bool]:
    """Empirical-Bayes ``beta0`` and ``any(M2 > 0)`` of one flattened source."""
    D = m2.numel()
    if n.dim() == 0:
        nv = float(n)
        if not nv >= 2:
            raise Decline("fewer than 2 samples in every dimension (the reference raises)")
        total = float(m2.sum(dtype=torch.float64))  # float32 sums over D overflow at M2 ~ 1e33
        return alpha0 * (total / nv / D), total > 0
    valid = n >= 2
    n_valid = float(valid.sum())
    if not n_valid > 0:
        raise Decline("fewer than 2 samples in every dimension (the reference raises)")
    var = torch.where(valid, m2 / torch.clamp(n, min=2.0), 0.0)
    vbar = float(var.sum(dtype=torch.float64)) / n_valid
    return alpha0 * vbar, bool((m2 > 0).any())


def _full(
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
) -> Calibration:
    """The full result; raises :class:`Decline` to decline."""
    dtype = space.dtype
    if config.weights == "dempster":
        raise Decline("weights='dempster' is not compiled (use torch-fused)")
    problem = decline_reason(space, stats, config)
    if problem:
        raise Decline(problem)
    shape = tuple(stats[0].shape)
    D, S = math.prod(shape), len(stats)
    prior = config.prior
    opts = (
        config.evidence_from == "snr",
        prior.kappa0 == 0,
        config.weights,
        config.scale == "belief",
    )
    key = (opts, S, dtype)
    if key in _BROKEN:
        raise Decline(_BROKEN[key])
    try:
        with torch.no_grad():
            return _run(space, names, stats, lambdas, config, opts, shape, D, S, dtype)
    except Decline:
        raise
    except Exception as exc:  # noqa: BLE001 - compile/runtime failure: the reference runs
        reason = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}"
        _BROKEN[key] = reason
        raise Decline(reason) from exc


def _run(space, names, stats, lambdas, config, opts, shape, D, S, dtype) -> Calibration:
    prior = config.prior
    tiny, big = space.tiny, space.max
    dev = stats[0].mean.device
    ms = [s.mean.reshape(-1) for s in stats]
    m2s = [s.m2.reshape(-1) for s in stats]
    ns = []
    for s in stats:
        n = s.count
        ns.append(n.reshape(()) if n.numel() == 1 else n.expand(shape).reshape(-1))

    zero_var: list[str] = []
    beta0s = []
    for name, m2, n in zip(names, m2s, ns, strict=False):
        if prior.beta0 is not None:
            beta0s.append(float(prior.beta0))
            continue
        source_beta0, any_var = _eb_beta0(m2, n, float(prior.alpha0))
        beta0s.append(source_beta0)
        if not any_var:
            zero_var.append(name)
    # Constant part of each score for one count: log(alpha) + log(kappa).
    consts = []
    for n in ns:
        if n.dim() == 0:
            nv = float(n)
            a = float(torch.clamp(torch.tensor(prior.alpha0 + 0.5 * nv, dtype=dtype), min=tiny))
            k = float(torch.clamp(torch.tensor(prior.kappa0 + nv, dtype=dtype), min=tiny))
            consts.append(math.log(a) + math.log(k))
        else:
            consts.append(0.0)
    equal = bool(zero_var) or float(config.gamma) == 0.0
    smax = math.inf if config.s_max is None else float(config.s_max)
    p = torch.tensor(
        [
            float(prior.mu0),
            float(prior.kappa0),
            float(prior.alpha0),
            float(config.gamma),
            float(config.clip),
            float(config.prior_weight),
            smax,
            tiny,
            big,
            1.0 if equal else 0.0,
            float(S),
        ],
        dtype=dtype,
        device=dev,
    )
    beta0 = torch.tensor(beta0s, dtype=dtype, device=dev)
    c = torch.tensor(consts, dtype=dtype, device=dev)
    lam = torch.tensor([float(x) for x in lambdas], dtype=dtype, device=dev)
    fns = compiled_stages(opts, S, dtype)
    E = _empty_output((S, D), dtype, dev)
    Wt = _empty_output((S, D), dtype, dev)
    U = _empty_output((D,), dtype, dev)
    B = _empty_output((D,), dtype, dev)
    G = _empty_output((D,), dtype, dev)
    Es = list(E.unbind(0))
    if equal:
        ref = torch.zeros((), dtype=dtype, device=dev)
    else:
        total, count = fns["ref"](ms, m2s, ns, beta0, c, p, opts, Es)
        ref = total / torch.clamp(count, min=1.0)
    bsum = fns["main"](ms, ns, lam, ref, p, opts, Es, list(Wt.unbind(0)), U, B, G)
    if opts[3]:
        fns["scale"](B, G, bsum / D, p)
    else:
        B.fill_(1.0)
        G.mul_(float(S))
    s, g = B, G
    flags = {"path": NAME, "zero_variance_sources": zero_var}
    return Calibration(
        g.reshape(shape),
        Wt.reshape((S,) + shape),
        U.reshape(shape),
        s.reshape(shape),
        E.reshape((S,) + shape),
        names,
        config.prior_weight,
        flags,
    )



def calibrate(
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
) -> Calibration:
    """The full :class:`Calibration` of one group through the compiled stages."""
    return _full(space, names, stats, lambdas, config)


def calibrate_gradient(
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
    *,
    out: Any = None,
    segments: Sequence[int] | None = None,
    diagnostics: dict[str, Any] | None = None,
) -> Any:
    """``calibrate(...).gradient`` through the compiled stages, one group per segment.

    Segments run one compiled call each (a Python loop over segments): this
    path is opt-in; the segment-vectorised engine is ``torch-fused``'s.
    """
    shape, D = check_gradient_call(space, stats, config, segments, out)
    bounds = [(0, D)]
    if segments is not None:
        ends = list(itertools.accumulate(int(n) for n in segments))
        bounds = list(zip([0] + ends[:-1], ends))
    parts, zero_var = [], []
    for a, b in bounds:
        seg = stats if segments is None else [_slice_stats(s, a, b) for s in stats]
        cal = calibrate(space, names, seg, lambdas, config)
        parts.append(cal.gradient)
        zero_var.extend(cal.flags["zero_variance_sources"])
    g = parts[0] if len(parts) == 1 else torch.cat(parts)
    if diagnostics is not None:
        diagnostics["path"] = NAME
        diagnostics["zero_variance_sources"] = [n for n in names if n in set(zero_var)]
    if out is None:
        return g
    out.copy_(g)
    return out


def _slice_stats(s: Any, a: int, b: int) -> Any:
    count = s.count if s.count.numel() == 1 else s.count[a:b]
    return type(s)(count, s.mean[a:b], s.m2[a:b])
