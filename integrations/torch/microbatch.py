"""Micro-batch gradient samples: the gradient of each of ``chunks`` micro-batches' mean loss.

Chunk ``j`` of source ``k`` covers ``n_j`` contiguous examples; its sample is
the gradient of the chunk's mean loss, weighted by ``f_j = n_j c / B`` so that
the statistics' mean is exactly the gradient of ``loss.mean()`` even when
``B`` is not a multiple of ``c``. Layers of the per-layer
shortcut get the chunk gradients from their recorded inputs and output
gradients (:func:`~.layer_grads.slice_sums`); the chunks of all sources share batched
backward passes elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from bogc_core.backends.torch_fused import chunk_moments
from torch import nn

from bogc_core.errors import ConfigError

from .accumulate import Accumulator, Moments
from .layer_grads import embedding_slice_moments, slice_sums
from .samples import (
    Problem,
    Row,
    SourceStats,
    Stats,
    chunk_slices,
    generic_rows,
    require_examples,
    use_deltas,
    work_dtype,
)
from .sharded import layer_type
from .shortcut import Tap
from .source import SampleContext, SampleSource

__all__ = ["Microbatch", "microbatch"]

#: Tensors of at most this many elements take their moments from one shared buffer
#: (where the compiled loop does not take them).
SMALL = 1 << 16

#: Embedding tables whose chunk sums ``(C, num, dim)`` hold at most this many elements are
#: summed densely and take their moments as any tensor (equal chunks); larger ones take
#: them from the rows the batch touched alone (no ``(C, num, dim)`` is formed).
DENSE_EMBEDDING = 1 << 16

Sink = Callable[[str, int], "tuple[torch.Tensor, torch.Tensor] | None"] | None


def microbatch(prob: Problem, chunks: int, chunk_bytes: int = 1 << 26, sink: Sink = None) -> SourceStats:
    """Statistics of ``chunks`` micro-batch gradients per source.

    Chunk ``j`` of source ``k`` covers ``n_j`` contiguous examples; its sample
    is the gradient of the chunk's mean loss, weighted by ``f_j = n_j c / B``
    so that the statistics' mean is exactly the gradient of ``loss.mean()``
    even when ``B`` is not a multiple of ``c`` (equal chunks: unit weights).
    The chunks of all sources share batched backward passes.

    ``sink`` as in :class:`~.source.SampleContext`: the moments of equal chunks
    of a shortcut layer go straight there when the compiled loops take them.
    """
    S = len(prob.names)
    for k in range(S):
        require_examples(prob, k, 2, "two or more micro-batches")
    out: SourceStats = {n: {} for n in prob.names}
    slices = [chunk_slices(prob.batch(k), chunks) for k in range(S)]

    def weight(k: int, j: int) -> float:
        s = slices[k][j]
        return (s.stop - s.start) * len(slices[k]) / prob.batch(k)

    acc: dict[tuple[int, int], Accumulator] = {}
    # Shortcut: chunk gradients of a linear layer from the per-example deltas,
    # g_j = delta_j^T x_j / n_j over the rows of chunk j (one matmul per chunk:
    # the FLOPs of a single weight gradient).
    sc = [k for k in range(S) if prob.shortcut and prob.shortcut[k]]
    f = {k: torch.tensor([weight(k, j) for j in range(len(slices[k]))], dtype=torch.float64) for k in sc}
    inv = {k: torch.tensor([1.0 / (s_.stop - s_.start) for s_ in slices[k]], dtype=torch.float64) for k in sc}
    unit = {k: bool((f[k] == 1).all()) for k in sc}
    inv1 = {k: float(inv[k][0]) for k in sc}  # equal chunks: every chunk's 1 / n_j
    small: dict[tuple[int, torch.dtype, torch.device], list[tuple[int, torch.Tensor]]] = {}

    def use(k: int, tap: Tap, delta: torch.Tensor) -> None:
        dt = work_dtype(tap.layer_weight)
        if layer_type(tap.module) is nn.Embedding and tap.weight is not None and not (
                unit[k] and len(slices[k]) * tap.layer_weight.numel() <= DENSE_EMBEDDING):
            W, mean, m2 = embedding_slice_moments(tap, dt, delta, slices[k], f[k].tolist())
            acc.setdefault((k, tap.weight), Accumulator()).add_moments(W, mean, m2)
            return
        for idx, g in slice_sums(tap, dt, delta, slices[k]).items():
            if unit[k] and _compiled_moments(out[prob.names[k]], idx, g, inv1[k],
                                             sink and sink(prob.names[k], idx)):
                continue
            if unit[k] and g[0].numel() <= SMALL:
                small.setdefault((k, g.dtype, g.device), []).append((idx, g))
                continue
            scale = inv[k].to(dtype=dt, device=g.device).reshape((-1,) + (1,) * (g.dim() - 1))
            fw = None if unit[k] else f[k].to(dtype=dt, device=g.device)
            acc.setdefault((k, idx), Accumulator()).add(g.mul_(scale), fw, owned=True)

    use_deltas(prob, sc, use)
    for (k, _, _), items in small.items():
        out[prob.names[k]].update(_equal_chunk_moments(items, inv1[k]))

    gen = [prob.generic(k) for k in range(S)]
    rows = [
        Row(k, s_, 1.0 / (s_.stop - s_.start), weight(k, j))
        for j in range(max(len(sl) for sl in slices))
        for k in range(S) if gen[k] and j < len(slices[k])
        for s_ in [slices[k][j]]
    ]
    # Source-major order keeps each source's rows contiguous within a batch.
    rows.sort(key=lambda r: r.k)
    generic_rows(prob, gen, rows, chunk_bytes, acc)
    for (k, i), a in acc.items():
        out[prob.names[k]][i] = a.stats()
    return out


def _compiled_moments(out: dict[int, Stats], idx: int, g: torch.Tensor, inv: float,
                      views: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """``out[idx]``: the moments of equal chunks, each chunk's sample ``g[j] * inv``, from
    the compiled loop, into ``views`` (the calibrator's buffers) when given; ``False``
    where the loop cannot take them (nothing done)."""
    mean, m2 = views if views is not None else (torch.empty_like(g[0]), torch.empty_like(g[0]))
    if not chunk_moments(g, inv, mean, m2):
        return False
    out[idx] = Moments(float(g.shape[0]), mean, m2)
    return True


def _equal_chunk_moments(items: list[tuple[int, torch.Tensor]], inv: float) -> dict[int, Moments]:
    """``(n, m, M2)`` of equal chunks, ``items``: ``(index, sums (C, *shape))`` of tensors of
    one dtype and device, each chunk's sample ``sums[j] * inv``. Small tensors share one
    ``(C, total)`` buffer, so the few reductions run once for all of them rather than once
    per tensor (whose fixed cost dominates below about :data:`SMALL` elements)."""
    flat = torch.cat([g.reshape(g.shape[0], -1) for _, g in items], dim=1).mul_(inv)
    C = flat.shape[0]
    mean = flat.mean(dim=0)
    d = flat.sub_(mean)
    m2 = d.mul_(d).sum(dim=0)
    out, off = {}, 0
    for idx, g in items:
        n = g[0].numel()
        out[idx] = Moments(float(C), mean[off : off + n].view(g.shape[1:]),
                           m2[off : off + n].view(g.shape[1:]))
        off += n
    return out


class Microbatch(SampleSource):
    """``chunks`` micro-batch samples per source (shorthand ``samples="microbatch"``).

    ``chunks``: micro-batches per source and step, an int >= 2; ``rho`` and
    ``chunk_bytes`` as in :class:`~.source.SampleSource`.
    """

    NAME = "microbatch"
    USES_SHORTCUT = True

    def __init__(self, chunks: int = 4, *, rho: float | None = None,
                 chunk_bytes: int | None = None) -> None:
        super().__init__(rho, chunk_bytes)
        if not (isinstance(chunks, int) and not isinstance(chunks, bool) and chunks >= 2):
            raise ConfigError(
                f"Microbatch(chunks=): must be an int >= 2 (micro-batches per step), got {chunks!r}"
            )
        self.chunks = chunks

    def options(self) -> dict[str, Any]:
        return {"chunks": self.chunks, **super().options()}

    def sample(self, prob: Problem, ctx: SampleContext) -> SourceStats:
        return microbatch(prob, self.chunks, self.bound(ctx), ctx.sink)
