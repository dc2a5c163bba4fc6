"""Per-example gradient samples: ``g_i = grad l_i`` for every example ``i`` of a source.

Linear layers of the per-layer shortcut get every source's sums from two
matrix products per layer, ``sum_i g_i = delta^T x`` and
``sum_i g_i^2 = (delta^2)^T (x^2)`` with the sources stacked along the output
axis (``x^2`` is formed once per layer and shared by all sources). Conv2d
layers of the shortcut form per-example gradients one memory-bounded block at
a time; every other parameter gets exact per-example gradient rows from
batched backward passes (:func:`~.samples.generic_rows`).
"""

from __future__ import annotations

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
from .shortcut import conv_per_example_sums, factors
from .source import SampleContext, SampleSource

__all__ = ["PerExample", "per_example"]


def _linear_sums(x: torch.Tensor, G: torch.Tensor, with_weight: bool, with_bias: bool):
    """Sums for ``R`` sources at once: ``G`` ``(R, N, out)``, ``x`` ``(N, in)``.

    Returns ``{"weight": (R, out, in) x 2, "bias": (R, out) x 2}`` of
    ``(sum g, sum g^2)``; one product for the sums and one for the squares.
    """
    R, N, out = G.shape
    res = {}
    # (N, R*out): the sources side by side, so each product covers all of them.
    D = G.permute(1, 0, 2).reshape(N, R * out)
    D2 = D * D
    if with_weight:
        x2 = x * x
        res["weight"] = (
            (D.T @ x).reshape(R, out, -1),
            (D2.T @ x2).reshape(R, out, -1),
        )
    if with_bias:
        res["bias"] = (D.sum(dim=0).reshape(R, out), D2.sum(dim=0).reshape(R, out))
    return res


def per_example(prob: Problem, chunk_bytes: int = 1 << 26) -> SourceStats:
    """Statistics of the per-example gradients of every source (see the module docstring)."""
    S = len(prob.names)
    for k in range(S):
        require_examples(prob, k, 2, "per-example gradient statistics")
    out: SourceStats = {n: {} for n in prob.names}
    with_sc = [k for k in range(S) if prob.shortcut and prob.shortcut[k]]
    for tap, ks, G in delta_batches(prob, with_sc):
        dt = work_dtype(tap.module.weight)
        has_w, has_b = tap.weight is not None, tap.bias is not None
        if type(tap.module) is nn.Linear:
            sums = _linear_sums(tap.x.to(dt), G.to(dt), has_w, has_b)
            for key, idx in (("weight", tap.weight), ("bias", tap.bias)):
                if idx is None:
                    continue
                total, total_sq = sums[key]
                shape = prob.params[idx].shape
                for r, k in enumerate(ks):
                    out[prob.names[k]][idx] = stats_from_sums(
                        float(prob.batch(k)), total[r].reshape(shape), total_sq[r].reshape(shape)
                    )
            continue
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
    """``samples="per_example"``: one sample per example."""

    NAME = "per_example"
    USES_SHORTCUT = True

    def sample(self, prob: Problem, ctx: SampleContext) -> SourceStats:
        return per_example(prob, ctx.chunk_bytes)
