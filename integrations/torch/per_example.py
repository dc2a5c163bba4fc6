"""Per-example gradient samples: ``g_i = grad l_i`` for every example ``i`` of a source.

Layers of the per-layer shortcut (Linear on inputs of any rank, Conv2d,
Embedding, LayerNorm: :mod:`.shortcut`) get each source's sums
``sum_i g_i`` and ``sum_i g_i^2`` from the layer's recorded input and one
backward pass per source to the layer outputs (:mod:`.layer_grads`); a
source that does not reach a layer costs nothing there. The sums are written
straight into the calibrator's flat buffers when it offers them. Every other
parameter gets exact per-example gradient rows from batched backward passes
(:func:`~.samples.generic_rows`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .accumulate import Accumulator
from .layer_grads import example_sums
from .samples import (
    Problem,
    Row,
    SourceStats,
    generic_rows,
    require_examples,
    stats_from_sums,
    use_deltas,
    work_dtype,
)
from .shortcut import Tap
from .source import SampleContext, SampleSource

__all__ = ["PerExample", "per_example"]


Sink = Callable[[str, int], "tuple[torch.Tensor, torch.Tensor] | None"] | None


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

    def use(k: int, tap: Tap, delta: torch.Tensor) -> None:
        name, n = prob.names[k], float(prob.batch(k))
        into = (lambda idx: sink(name, idx)) if sink is not None else None
        for idx, (tot, sq) in example_sums(tap, work_dtype(tap.layer_weight), delta, chunk_bytes, into).items():
            shape = prob.params[idx].shape
            views = sink(name, idx) if sink is not None else None
            if views is not None and tot.data_ptr() != views[0].data_ptr():
                views[0].copy_(tot.reshape(shape))
                views[1].copy_(sq.reshape(shape))
            if views is not None:
                tot, sq = views
            out[name][idx] = stats_from_sums(n, tot.reshape(shape), sq.reshape(shape))

    use_deltas(prob, with_sc, use)

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

    def __init__(self, *, rho: float | None = None, chunk_bytes: int | None = None) -> None:
        super().__init__(rho, chunk_bytes)

    def sample(self, prob: Problem, ctx: SampleContext) -> SourceStats:
        return per_example(prob, self.bound(ctx), ctx.sink)
