"""Per-example gradient samples: ``g_i = grad l_i`` for every example ``i`` of a source.

Linear layers of the per-layer shortcut get each source's sums from two
matrix products, ``sum_i g_i = delta^T x`` and
``sum_i g_i^2 = (delta^2)^T (x^2)`` (``x^2`` is formed once per layer and
shared by all sources; a source that does not reach the layer costs nothing
there), written straight into the calibrator's flat buffers when it offers
them. Conv2d
layers of the shortcut form per-example gradients one memory-bounded block at
a time; every other parameter gets exact per-example gradient rows from
batched backward passes (:func:`~.samples.generic_rows`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .accumulate import Accumulator
from .samples import (
    Problem,
    Row,
    SourceStats,
    delta_batches,
    generic_rows,
    require_examples,
    stats_from_sums,
    work_dtype,
)
from .sharded import layer_type
from .shortcut import conv_per_example_sums, factors
from .source import CHUNK_BYTES, SampleContext, SampleSource

__all__ = ["PerExample", "per_example"]


Sink = Callable[[str, int], "tuple[torch.Tensor, torch.Tensor] | None"] | None


def _buffers(sink: Sink, name: str, idx: int, shape: torch.Size, like: torch.Tensor):
    """Where source ``name``'s sums of parameter ``idx`` go: the sink's views, or new tensors."""
    views = sink(name, idx) if sink is not None else None
    if views is not None:
        return views
    return (torch.empty(shape, dtype=like.dtype, device=like.device),
            torch.empty(shape, dtype=like.dtype, device=like.device))


def _linear_stats(prob: Problem, tap, ks: list[int], G: torch.Tensor, dt: torch.dtype, sink: Sink,
                  out: SourceStats) -> None:
    """Statistics of a Linear layer for the sources ``ks`` (``G[r]``: source ``ks[r]``'s
    output gradient ``(N, out)``), from ``delta^T x`` and ``(delta^2)^T (x^2)``; ``x^2`` and
    ``delta^2`` are formed once for all sources."""
    x = tap.x.to(dt)
    G = G.to(dt)
    G2 = G * G
    x2 = x * x
    for r, k in enumerate(ks):
        name, n = prob.names[k], float(prob.batch(k))
        if tap.weight is not None:
            shape = prob.params[tap.weight].shape
            tot, sq = _buffers(sink, name, tap.weight, shape, x)
            torch.mm(G[r].T, x, out=tot.view(G.shape[2], x.shape[1]))
            torch.mm(G2[r].T, x2, out=sq.view(G.shape[2], x.shape[1]))
            out[name][tap.weight] = stats_from_sums(n, tot, sq)
        if tap.bias is not None:
            shape = prob.params[tap.bias].shape
            tot, sq = _buffers(sink, name, tap.bias, shape, x)
            torch.sum(G[r], dim=0, out=tot.view(-1))
            torch.sum(G2[r], dim=0, out=sq.view(-1))
            out[name][tap.bias] = stats_from_sums(n, tot, sq)


def per_example(prob: Problem, chunk_bytes: int = 1 << 26, sink: Sink = None) -> SourceStats:
    """Statistics of the per-example gradients of every source (see the module docstring).

    ``sink`` as in :class:`~.source.SampleContext`: the Linear shortcut writes its
    statistics there when it gives a place for them.
    """
    S = len(prob.names)
    for k in range(S):
        require_examples(prob, k, 2, "per-example gradient statistics")
    out: SourceStats = {n: {} for n in prob.names}
    with_sc = [k for k in range(S) if prob.shortcut and prob.shortcut[k]]
    pending = delta_batches(prob, with_sc)
    pending.reverse()
    while pending:
        # Popped, so that each layer's output gradients are freed once used.
        tap, ks, G = pending.pop()
        dt = work_dtype(tap.layer_weight)
        if layer_type(tap.module) is nn.Linear:
            _linear_stats(prob, tap, ks, G, dt, sink, out)
            continue
        has_w, has_b = tap.weight is not None, tap.bias is not None
        for r, k in enumerate(ks):
            A, Bm = factors(tap, dt, G[r])
            csums = conv_per_example_sums(A, Bm, has_w, has_b, chunk_bytes)
            for key, idx in (("weight", tap.weight), ("bias", tap.bias)):
                if idx is None:
                    continue
                total, total_sq = csums[key]
                shape = prob.params[idx].shape
                out[prob.names[k]][idx] = stats_from_sums(
                    float(prob.batch(k)), total.reshape(shape), total_sq.reshape(shape)
                )

    gen = [prob.generic(k) for k in range(S)]
    rows = [Row(k, slice(i, i + 1), 1.0, 1.0) for k in range(S) if gen[k] for i in range(prob.batch(k))]
    acc: dict[tuple[int, int], Accumulator] = {}
    generic_rows(prob, gen, rows, chunk_bytes, acc)
    for (k, i), a in acc.items():
        out[prob.names[k]][i] = a.stats()
    return out


class PerExample(SampleSource):
    """One sample per example (shorthand ``samples="per_example"``); ``rho`` and
    ``chunk_bytes`` as in :class:`~.source.SampleSource`."""

    NAME = "per_example"
    USES_SHORTCUT = True

    def __init__(self, *, rho: float | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__(rho, chunk_bytes)

    def sample(self, prob: Problem, ctx: SampleContext) -> SourceStats:
        return per_example(prob, self.chunk_bytes, ctx.sink)
