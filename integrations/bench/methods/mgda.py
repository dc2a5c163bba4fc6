"""MGDA: one min-norm point over all shared parameters and all losses.

Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018 (after Désidéri's MGDA, 2012), Algorithm 2 (MGDA-UB without the
upper-bound shortcut). With ``g_k`` the gradient of loss ``k`` (fusion and
every unimodal loss) with respect to *all* shared parameters (every encoder;
zero where loss ``k`` does not reach), flattened to one vector of length ``D``::

    alpha = argmin_{alpha in simplex} || sum_k alpha_k g_k ||^2

solved in closed form for two losses and by Frank-Wolfe for more (started from the
best pair's closed-form point, as the authors' solver does), on the Gram
matrix ``M_ij = g_i . g_j`` (float64), then solved exactly on the face Frank-Wolfe
reached (see :func:`_polish`), so the weights are the exact min-norm point rather
than Frank-Wolfe's ``O(1/k)`` approximation of it. Each Frank-Wolfe step moves towards the vertex
``t = argmin_r (M alpha)_r`` with the exact line search of the two-point
problem::

    min_{c in [0, 1]} || c a + (1 - c) b ||^2,  c = clip((b.b - a.b) / ||a - b||^2, 0, 1)

The shared parameters get ``sum_k alpha_k g_k``; task-specific parameters
(the heads, reached by one loss) get their own loss's gradient, as in the
paper's algorithm. The common learning rate absorbs the ``1/S`` scale of a
convex combination (it is tuned on validation like every method's).

``mgda_per_encoder`` (ablation, the earlier variant): a separate two-loss
min-norm point per encoder, times 2.
"""

from __future__ import annotations

import torch

from .base import EncoderRuleMethod, JointRuleMethod, flat, unflat


def min_norm_2(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """Weight ``a`` of ``g1`` in the min-norm element of ``conv{g1, g2}`` (flat vectors)."""
    diff = g1 - g2
    den = torch.dot(diff, diff)
    if den <= 0:
        return 0.5
    return float(torch.clamp(torch.dot(g2 - g1, g2) / den, 0.0, 1.0))


def _line(aa: float, ab: float, bb: float) -> float:
    """``argmin_{c in [0,1]} ||c a + (1-c) b||^2`` from the three inner products."""
    den = aa + bb - 2.0 * ab
    if den <= 0.0:
        return 0.5
    return min(1.0, max(0.0, (bb - ab) / den))


def min_norm(gram: torch.Tensor, max_iter: int = 250, tol: float = 1e-8) -> torch.Tensor:
    """Simplex weights ``alpha`` ``(S,)`` of the min-norm point of ``conv{g_1..g_S}``.

    ``gram``: ``(S, S)`` Gram matrix ``g_i . g_j``. Closed form for ``S = 2``,
    Frank-Wolfe from the best two-loss point otherwise (``max_iter`` steps or until
    the weights move less than ``tol``), then the exact solve on the face it reached
    (:func:`_polish`). Computed in float64.
    """
    M = gram.detach().to(torch.float64)
    S = M.shape[0]
    if S == 1:
        return torch.ones(1, dtype=torch.float64)
    if S == 2:
        c = _line(float(M[0, 0]), float(M[0, 1]), float(M[1, 1]))
        return torch.tensor([c, 1.0 - c], dtype=torch.float64)
    # start from the best two-loss min-norm point, as the authors' solver does
    best = (float("inf"), 0, 1, 0.5)
    for i in range(S):
        for j in range(i + 1, S):
            c = _line(float(M[i, i]), float(M[i, j]), float(M[j, j]))
            cost = c * c * float(M[i, i]) + 2 * c * (1 - c) * float(M[i, j]) + (1 - c) ** 2 * float(M[j, j])
            if cost < best[0]:
                best = (cost, i, j, c)
    _, i, j, c = best
    alpha = torch.zeros(S, dtype=torch.float64)
    alpha[i], alpha[j] = c, 1.0 - c
    for _ in range(max_iter):
        Ma = M @ alpha
        t = int(torch.argmin(Ma))
        # a = current point sum alpha_k g_k, b = vertex g_t
        aa, ab, bb = float(alpha @ Ma), float(Ma[t]), float(M[t, t])
        c = _line(aa, ab, bb)
        new = c * alpha
        new[t] += 1.0 - c
        moved = float((new - alpha).abs().sum())
        alpha = new
        if moved < tol:
            break
    return _polish(M, alpha)


def _polish(M: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Exact minimiser on the face that Frank-Wolfe found (it converges only as ``O(1/k)``).

    On a support ``A`` the stationarity condition of ``min a^T M a`` subject to
    ``sum a = 1`` is ``M_AA a_A = lambda 1``, so ``a_A = M_AA^+ 1 / (1^T M_AA^+ 1)``.
    Where a weight comes out negative its loss leaves the support and the solve
    is repeated. The result replaces ``alpha`` only if it is feasible and no worse.
    """
    best, best_cost = alpha, float(alpha @ M @ alpha)
    support = [int(i) for i in torch.nonzero(alpha > 0).flatten()]
    while support:
        sub = M[support][:, support]
        x = torch.linalg.lstsq(sub, torch.ones(len(support), 1, dtype=M.dtype)).solution[:, 0]
        den = float(x.sum())
        if den <= 0.0:
            break
        a = x / den
        if bool((a < 0).any()):
            support.pop(int(torch.argmin(a)))
            continue
        cand = torch.zeros_like(alpha)
        cand[support] = a
        cost = float(cand @ M @ cand)
        if cost <= best_cost:
            best, best_cost = cand, cost
        break
    return best


class MGDA(JointRuleMethod):
    """``mgda``: Sener and Koltun's min-norm point over all shared parameters and losses."""

    name = "mgda"
    diag_key = "alpha"

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return min_norm(gram)


class MGDAPerEncoder(EncoderRuleMethod):
    """``mgda_per_encoder`` (ablation): one two-loss min-norm point per encoder, times 2."""

    name = "mgda_per_encoder"

    def combine(self, grads, sources, diag):
        if len(grads) != 2:
            raise ValueError("mgda_per_encoder is the two-objective solver; each encoder has two sources")
        g1, g2 = flat(grads[0]), flat(grads[1])
        a = min_norm_2(g1, g2)
        return unflat(2.0 * (a * g1 + (1 - a) * g2), grads[0])
