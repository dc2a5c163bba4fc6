"""Per-example and per-micro-batch gradients of one recorded layer call, from the math.

A recorded call (:class:`~.shortcut.Tap`) holds the layer's input ``x`` and, once
the backward to the layer outputs has run, the output gradient
``delta = d sum_i l_i / d out`` (each example's loss depends only on its own
rows of the output). Every per-example gradient is then a reduction over the
example's non-batch ("sequence") axes ``t``:

    Linear       g_i(W) = sum_t delta_it x_it^T          (out, in)
                 g_i(b) = sum_t delta_it                 (out,)
    Conv2d       g_i(W) = delta_i U_i^T  (U_i = unfold(x_i): the positions are the t axis)
    Embedding    g_i(E) = sum_t e_{idx_it} delta_it^T    (num, dim): row ``idx_it`` gets
                 delta_it, except the ``padding_idx`` row, which gets no gradient
    LayerNorm    g_i(w) = sum_t delta_it * xhat_it,  g_i(b) = sum_t delta_it
                 (xhat: ``x`` normalised over the trailing ``normalized_shape`` axes)

:func:`example_sums` gives ``(sum_i g_i, sum_i g_i^2)`` of every calibrated
tensor of the call (the sufficient statistics of ``samples="per_example"``),
:func:`slice_sums` the sums ``sum_{i in j} g_i`` over contiguous slices ``j``
of examples (``samples="microbatch"``). Linear and Conv2d weights form their
per-example gradients one block of examples at a time (at most
``chunk_bytes`` each); a Linear call with one row per example needs no block:
``sum_i g_i^2 = (delta^2)^T (x^2)``. Embedding squares are taken over the
distinct ``(example, index)`` pairs, so nothing of size ``(N, num, dim)`` is
formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .sharded import layer_type
from .shortcut import Tap

__all__ = ["embedding_slice_moments", "example_sums", "slice_sums"]

Sums = dict[int, tuple[torch.Tensor, torch.Tensor]]


def _flat(tap: Tap, dt: torch.dtype, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``g_i(W) = A_i^T B_i``: ``A (N, T, out)``, ``B (N, T, in)``."""
    mod = tap.module
    d = delta.to(dt)
    N = d.shape[0]
    if layer_type(mod) is nn.Linear:
        # Contiguous once: output gradients of attention projections come back strided.
        return (d.reshape(N, -1, d.shape[-1]).contiguous(),
                tap.x.to(dt).reshape(N, -1, tap.x.shape[-1]).contiguous())
    assert isinstance(mod, nn.Conv2d) and not isinstance(mod.padding, str)  # see supported()
    U = F.unfold(tap.x.to(dt), mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                 stride=mod.stride)
    return d.reshape(N, d.shape[1], -1).transpose(1, 2), U.transpose(1, 2)


# Per-example gradient rows are squared while a block of them still sits in cache.
CACHE_BYTES = 1 << 21
# Examples whose squared inputs and output gradients are formed at a time (one row each):
# 1 MiB of them keeps the transient small and each sum-of-squares product long enough to
# run near the product's full speed (256 KiB measured 4% slower on the trunk of
# benchmarks/step.py at batch 256, with no lower peak memory at batch 512).
SQUARE_BYTES = 1 << 20


def _blocked_squares(A: torch.Tensor, B: torch.Tensor, chunk_bytes: int,
                     into: tuple[torch.Tensor, torch.Tensor] | None = None):
    """``(sum_i A_i^T B_i, sum_i (A_i^T B_i)^2)``: per-example products formed in blocks of
    at most ``chunk_bytes`` of examples and, within those, of output rows small enough to
    be squared and summed while in cache. ``into``: ``(out, inner)`` tensors of ``A``'s
    dtype to write the two sums into (one row per example only), instead of new ones."""
    N, T, out = A.shape
    inner = B.shape[2]
    if T == 1:
        # One row per example: the square of an outer product is the outer product of squares,
        # taken over a few examples at a time so that their squares stay small.
        a, b = A[:, 0], B[:, 0]
        tot = torch.mm(a.T, b, out=None if into is None else into[0])
        step = max(1, SQUARE_BYTES // max((out + inner) * A.element_size(), 1))
        sq = torch.mm((a[:step] * a[:step]).T, b[:step] * b[:step], out=None if into is None else into[1])
        for s in range(step, N, step):
            a_s, b_s = a[s:s + step], b[s:s + step]
            sq.addmm_((a_s * a_s).T, b_s * b_s)
        return tot, sq
    tot = torch.mm(A.reshape(N * T, out).T, B.reshape(N * T, inner))
    size = A.element_size()
    R = max(1, int(chunk_bytes // max(out * inner * size, 1)))
    At = A.transpose(1, 2).contiguous()  # (N, out, T)
    sq = torch.zeros_like(tot)
    for s in range(0, N, R):
        a, b = At[s:s + R], B[s:s + R]
        rows = max(1, CACHE_BYTES // max(a.shape[0] * inner * size, 1))
        for o in range(0, out, rows):
            g = torch.bmm(a[:, o:o + rows], b)
            sq[o:o + rows] += g.mul_(g).sum(dim=0)
    return tot, sq


def _norm_rows(tap: Tap, dt: torch.dtype, delta: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """LayerNorm: ``(index, rows)`` of its weight and bias (those it has), ``rows`` ``(N,
    *normalized_shape)`` the per-example gradients ``sum_t delta * xhat`` and ``sum_t delta``."""
    mod = tap.module
    assert isinstance(mod, nn.LayerNorm)
    shape = tuple(mod.normalized_shape)
    xhat = F.layer_norm(tap.x.to(dt), shape, None, None, mod.eps)
    d = delta.to(dt)
    N = d.shape[0]
    factors = ((tap.weight, d * xhat), (tap.bias, d))
    return [(idx, f.reshape((N, -1) + shape).sum(dim=1)) for idx, f in factors if idx is not None]


def _embedding_keys(tap: Tap, dt: torch.dtype, delta: torch.Tensor, group: torch.Tensor | None):
    """Token rows ``(M, dim)`` of ``delta``, their table rows, and their groups (example or
    slice), with the ``padding_idx`` tokens (which get no gradient) left out."""
    mod = tap.module
    assert isinstance(mod, nn.Embedding)
    N = delta.shape[0]
    x = tap.x if tap.x.shape[0] == N else tap.x.expand((N,) + tuple(tap.x.shape[1:]))  # broadcast
    idx = x.reshape(N, -1).long()
    who = (torch.arange(N, device=idx.device) if group is None else group.to(idx.device))
    who = who[:, None].expand_as(idx).reshape(-1)
    idx = idx.reshape(-1)
    d = delta.to(dt).reshape(idx.shape[0], -1)
    if mod.padding_idx is not None:
        keep = idx != mod.padding_idx
        idx, who, d = idx[keep], who[keep], d[keep]
    return d, idx, who


def example_sums(tap: Tap, dt: torch.dtype, delta: torch.Tensor, chunk_bytes: int,
                 into: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> Sums:
    """``{parameter index: (sum_i g_i, sum_i g_i^2)}`` for the call's calibrated tensors,
    each sum in the parameter's shape and dtype ``dt``. ``into(index)``: tensors in the
    parameter's shape where a Linear weight's sums may be written (``None``: new ones)."""
    mod = tap.module
    kind = layer_type(mod)
    out: Sums = {}
    if kind is nn.Embedding:
        assert isinstance(mod, nn.Embedding) and tap.weight is not None
        d, idx, who = _embedding_keys(tap, dt, delta, None)
        num = mod.num_embeddings
        tot = torch.zeros((num, d.shape[1]), dtype=dt, device=d.device).index_add_(0, idx, d)
        # Per-example rows: one per distinct (example, index) pair.
        pairs, inv = torch.unique(who * num + idx, return_inverse=True)
        g = torch.zeros((pairs.shape[0], d.shape[1]), dtype=dt, device=d.device).index_add_(0, inv, d)
        sq = torch.zeros_like(tot).index_add_(0, pairs % num, g.mul_(g))
        out[tap.weight] = (tot, sq)
        return out
    if kind is nn.LayerNorm:
        for idx, g in _norm_rows(tap, dt, delta):
            out[idx] = (g.sum(dim=0), (g * g).sum(dim=0))
        return out
    A, B = _flat(tap, dt, delta)
    if tap.weight is not None:
        dst = into(tap.weight) if into is not None and A.shape[1] == 1 else None
        if dst is not None and not all(t.dtype == dt and t.dim() == 2 and t.is_contiguous() for t in dst):
            dst = None
        tot, sq = _blocked_squares(A, B, chunk_bytes, dst)
        out[tap.weight] = (tot.reshape(tap.layer_weight.shape), sq.reshape(tap.layer_weight.shape))
    if tap.bias is not None:
        gb = A.sum(dim=1)
        out[tap.bias] = (gb.sum(dim=0), (gb * gb).sum(dim=0))
    return out


def embedding_slice_moments(tap: Tap, dt: torch.dtype, delta: torch.Tensor, slices: list[slice],
                            weights: list[float]) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Embedding: ``(W, m, M2)`` of the slice means ``g_j = sum_{i in j} g_i / n_j`` with
    frequency weights ``f_j``, from sums over the touched rows only (no ``(C, num, dim)``):
    ``W = sum_j f_j``, ``m = sum_j f_j g_j / W``, ``M2 = max(sum_j f_j g_j^2 - W m^2, 0)``."""
    mod = tap.module
    assert isinstance(mod, nn.Embedding) and tap.weight is not None
    group = torch.empty(delta.shape[0], dtype=torch.long)
    scale = torch.empty(len(slices), dtype=torch.float64)
    for j, s in enumerate(slices):
        group[s] = j
        scale[j] = 1.0 / (s.stop - s.start)
    d, idx, who = _embedding_keys(tap, dt, delta, group)
    d = d * scale.to(dtype=dt, device=d.device)[who][:, None]          # rows of g_j
    f = torch.tensor(weights, dtype=dt, device=d.device)
    W = float(sum(weights))
    num = mod.num_embeddings
    mean = torch.zeros((num, d.shape[1]), dtype=dt, device=d.device)
    mean.index_add_(0, idx, d * (f[who] / W)[:, None])
    pairs, inv = torch.unique(who * num + idx, return_inverse=True)
    g = torch.zeros((pairs.shape[0], d.shape[1]), dtype=dt, device=d.device).index_add_(0, inv, d)
    fg2 = g.mul_(g).mul_(f[pairs // num][:, None])
    m2 = torch.zeros_like(mean)
    # Only the rows some example touched are non-zero: finish M2 there alone.
    rows, rinv = torch.unique(pairs % num, return_inverse=True)
    part = torch.zeros((rows.shape[0], d.shape[1]), dtype=dt, device=d.device).index_add_(0, rinv, fg2)
    m = mean[rows]
    m2[rows] = part.addcmul_(m, m, value=-W).clamp_(min=0.0)
    return W, mean, m2


def slice_sums(tap: Tap, dt: torch.dtype, delta: torch.Tensor, slices: list[slice]) -> dict[int, torch.Tensor]:
    """``{parameter index: (C, *shape)}``: row ``j`` is ``sum_{i in slices[j]} g_i``."""
    mod = tap.module
    kind = layer_type(mod)
    C = len(slices)
    out: dict[int, torch.Tensor] = {}
    if kind is nn.Embedding:
        assert isinstance(mod, nn.Embedding) and tap.weight is not None
        group = torch.empty(delta.shape[0], dtype=torch.long)
        for j, s in enumerate(slices):
            group[s] = j
        d, idx, who = _embedding_keys(tap, dt, delta, group)
        num = mod.num_embeddings
        g = torch.zeros((C * num, d.shape[1]), dtype=dt, device=d.device)
        g.index_add_(0, who * num + idx, d)
        out[tap.weight] = g.reshape((C,) + tuple(mod.weight.shape))
        return out
    n = _equal_size(slices, delta.shape[0])

    def per_slice(rows: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (C, ...)
        if n is not None:
            return rows.reshape((C, n) + tuple(rows.shape[1:])).sum(dim=1)
        return torch.stack([rows[s].sum(dim=0) for s in slices])

    if kind is nn.LayerNorm:
        for idx, g in _norm_rows(tap, dt, delta):
            out[idx] = per_slice(g)
        return out
    A, B = _flat(tap, dt, delta)
    o, i = A.shape[2], B.shape[2]
    if tap.weight is not None:
        if n is not None:  # one batched product over the slices
            g = torch.bmm(A.reshape(C, -1, o).transpose(1, 2), B.reshape(C, -1, i))
        else:
            g = torch.empty((C, o, i), dtype=dt, device=A.device)
            for j, s in enumerate(slices):
                torch.mm(A[s].reshape(-1, o).T, B[s].reshape(-1, i), out=g[j])
        out[tap.weight] = g.reshape((C,) + tuple(tap.layer_weight.shape))
    if tap.bias is not None:
        out[tap.bias] = per_slice(A[:, 0] if A.shape[1] == 1 else A.sum(dim=1))
    return out


def _equal_size(slices: list[slice], N: int) -> int | None:
    """The common length of ``slices`` when they tile ``0..N`` in order, else None."""
    n = N // len(slices)
    if n * len(slices) != N or any(s.start != j * n or s.stop != (j + 1) * n
                                   for j, s in enumerate(slices)):
        return None
    return n
