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
        Ma = _matvec(M, alpha)
        t = int(torch.argmin(Ma))
        # a = current point sum alpha_k g_k, b = vertex g_t
        aa, ab, bb = float((alpha * Ma).sum()), float(Ma[t]), float(M[t, t])
        c = _line(aa, ab, bb)
        new = c * alpha
        new[t] += 1.0 - c
        moved = float((new - alpha).abs().sum())
        alpha = new
        if moved < tol:
            break
    return _polish(M, alpha)


def _matvec(M: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # Elementwise products summed by index: BLAS's matrix-vector product may round
    # differently with the buffers' alignment, i.e. from one process to the next, and
    # Frank-Wolfe's choices would then differ between runs of the same seed.
    return (M * a).sum(dim=1)


def _solve_ones(A: torch.Tensor) -> torch.Tensor:
    """``x`` with ``A x = 1`` for a small symmetric ``A``: Gaussian elimination with partial
    pivoting in Python floats (the same bits in every process, see :func:`_matvec`); the
    least-squares solution of LAPACK where ``A`` is singular to working precision."""
    n = A.shape[0]
    rows = [[*map(float, A[i].tolist()), 1.0] for i in range(n)]
    scale = max((abs(v) for r in rows for v in r[:n]), default=0.0)
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(rows[r][c]))
        if abs(rows[piv][c]) <= 1e-13 * scale:
            ones = torch.ones(n, 1, dtype=A.dtype)
            return torch.linalg.lstsq(A, ones).solution[:, 0]
        rows[c], rows[piv] = rows[piv], rows[c]
        for r in range(c + 1, n):
            f = rows[r][c] / rows[c][c]
            rows[r] = [a - f * b for a, b in zip(rows[r], rows[c])]
    x = [0.0] * n
    for c in range(n - 1, -1, -1):
        x[c] = (rows[c][n] - sum(rows[c][j] * x[j] for j in range(c + 1, n))) / rows[c][c]
    return torch.tensor(x, dtype=A.dtype)


def _quad(M: torch.Tensor, a: torch.Tensor) -> float:
    """``a^T M a``, summed in a fixed order (see :func:`_matvec`)."""
    return float((a * _matvec(M, a)).sum())


def _polish(M: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Exact minimiser on the face that Frank-Wolfe found (it converges only as ``O(1/k)``).

    On a support ``A`` the stationarity condition of ``min a^T M a`` subject to
    ``sum a = 1`` is ``M_AA a_A = lambda 1``, so ``a_A = M_AA^+ 1 / (1^T M_AA^+ 1)``.
    Where a weight comes out negative its loss leaves the support and the solve
    is repeated. The result replaces ``alpha`` only if it is feasible and no worse (up to
    a relative 1e-9, the round-off of the two costs).
    """
    best, best_cost = alpha, _quad(M, alpha)
    support = [int(i) for i in torch.nonzero(alpha > 0).flatten()]
    while support:
        sub = M[support][:, support]
        x = _solve_ones(sub)
        den = float(x.sum())
        if den <= 0.0:
            break
        a = x / den
        if bool((a < 0).any()):
            support.pop(int(torch.argmin(a)))
            continue
        cand = torch.zeros_like(alpha)
        cand[support] = a
        cost = _quad(M, cand)
        if cost <= best_cost * (1.0 + 1e-9):  # equal up to round-off: the exact point
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
