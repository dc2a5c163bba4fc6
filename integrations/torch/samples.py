"""Gradient samples of each source, summarised as statistics (docs/integrations.md, "The four sample sources").

Every function here takes a :class:`Problem` (the step's losses, the
calibrator's parameters and which of them each loss reaches) and returns, per
source and per reached parameter, the :class:`~bogc_core.GradientStats` of
that source's gradient samples. A sample is the gradient of the *mean* loss
over the examples it covers, so each source's sample mean is the gradient of
``loss.mean()``.

All sources share each backward pass: autograd is called once with a batch of
cotangent rows (``is_grads_batched=True``), each row selecting one source's
examples, so the graph is traversed once per batch of rows rather than once
per source and sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bogc_core import GradientStats
from bogc_core.errors import InsufficientSamplesError

from .accumulate import Accumulator
from .sharded import layer_type
from .shortcut import Tap, conv_per_example_sums, factors, per_example_sums

__all__ = ["Problem", "per_example", "microbatch", "step_means", "batched_grads", "work_dtype"]

SourceStats = dict[str, dict[int, GradientStats]]


def work_dtype(p: torch.Tensor) -> torch.dtype:
    """Statistics are kept in float64 for float64 parameters, float32 otherwise (AMP, bf16)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


@dataclass
class Problem:
    """One step's inputs to a sample source.

    ``losses[k]``: source ``names[k]``'s per-example losses ``(B_k,)`` (or a
    scalar for ``steps``); ``reach[k]``: indices of the parameters it reaches;
    ``taps``/``shortcut[k]``: the linear layers whose statistics source ``k``
    gets from the per-layer shortcut (parameters covered there are left out
    of the generic path).
    """

    names: list[str]
    losses: list[torch.Tensor]
    params: list[torch.Tensor]
    reach: list[set[int]]
    shortcut: list[list[Tap]] = field(default_factory=list)

    def generic(self, k: int) -> list[int]:
        covered = set()
        for tap in (self.shortcut[k] if self.shortcut else []):
            covered.update(i for i in (tap.weight, tap.bias) if i is not None)
        return sorted(self.reach[k] - covered)

    def batch(self, k: int) -> int:
        return int(self.losses[k].shape[0]) if self.losses[k].dim() else 1


def batched_grads(
    losses: list[torch.Tensor], cotangents: list[torch.Tensor], inputs: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Gradients of ``sum_k <cotangents[k][r], losses[k]>`` w.r.t. ``inputs`` for every row ``r``.

    ``cotangents[k]`` has shape ``(R, *losses[k].shape)``; returns one tensor
    ``(R, *inputs[i].shape)`` per input, from a single (vectorised) backward.
    """
    R = int(cotangents[0].shape[0])
    if R == 1:
        gs = torch.autograd.grad(
            losses, inputs, grad_outputs=[c[0] for c in cotangents],
            retain_graph=True, allow_unused=True, materialize_grads=True,
        )
        return [g.unsqueeze(0) for g in gs]
    return list(
        torch.autograd.grad(
            losses, inputs, grad_outputs=cotangents, retain_graph=True, allow_unused=True,
            is_grads_batched=True, materialize_grads=True,
        )
    )


def _stats_from_sums(n: float, total: torch.Tensor, total_sq: torch.Tensor) -> GradientStats:
    """``GradientStats.from_sums`` for fresh buffers, in place: ``m = total / n``,
    ``M2 = max(sum g^2 - total * m, 0)`` (float32 loses about ``eps * n * m^2``;
    see the bound tested in ``test_linear_shortcut_sums_match_materialised``)."""
    mean = total.div_(n)
    m2 = total_sq.addcmul_(mean, mean, value=-n).clamp_(min=0.0)
    return GradientStats(float(n), mean, m2)


def _unaliased(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the gradients that share storage with another (autograd may hand the same
    tensor to two inputs), so that each can be overwritten in place."""
    seen: set[int] = set()
    out = []
    for g in grads:
        ptr = g.untyped_storage().data_ptr()
        out.append(g.clone() if ptr in seen else g)
        seen.add(ptr)
    return out


def _require(prob: Problem, k: int, at_least: int, what: str) -> None:
    if prob.batch(k) < at_least:
        raise InsufficientSamplesError(
            f"losses[{prob.names[k]!r}]: {prob.batch(k)} example(s) cannot give {what}; pass a "
            f"per-example loss vector of at least {at_least} examples (reduction='none'), or use "
            f"samples='steps' to accumulate one gradient per step"
        )


def _delta_rows(prob: Problem, sources: list[int]) -> dict[int, dict[int, torch.Tensor]]:
    """``d loss_k.sum() / d out`` for every shortcut layer output, all sources in one backward."""
    taps: dict[int, Tap] = {}
    for k in sources:
        for tap in prob.shortcut[k]:
            taps[id(tap.out)] = tap
    if not taps:
        return {}
    outs = [t.out for t in taps.values()]
    cots = []
    for r, k in enumerate(sources):
        c = torch.zeros((len(sources),) + tuple(prob.losses[k].shape), dtype=prob.losses[k].dtype, device=prob.losses[k].device)
        c[r] = 1.0
        cots.append(c)
    grads = batched_grads([prob.losses[k] for k in sources], cots, outs)
    res: dict[int, dict[int, torch.Tensor]] = {}
    for r, k in enumerate(sources):
        res[k] = {tid: g[r] for tid, g in zip(taps, grads)}
    return res


def _shortcut_tensors(tap: Tap, dtype: torch.dtype, delta: torch.Tensor):
    return tap.x.to(dtype), delta.to(dtype)


def per_example(prob: Problem, chunk_bytes: int = 1 << 26) -> SourceStats:
    """Statistics of the per-example gradients ``g_i = grad l_i`` of every source.

    Linear layers in ``prob.shortcut`` use the ``(x^2)^T (delta^2)`` identity;
    every other reached parameter gets exact per-example gradients from
    batched backward passes of at most ``chunk_bytes`` of gradient rows each.
    """
    S = len(prob.names)
    for k in range(S):
        _require(prob, k, 2, "per-example gradient statistics")
    out: SourceStats = {n: {} for n in prob.names}
    with_sc = [k for k in range(S) if prob.shortcut and prob.shortcut[k]]
    deltas = _delta_rows(prob, with_sc)
    for k in with_sc:
        B = float(prob.batch(k))
        mine = deltas.pop(k)
        for tap in prob.shortcut[k]:
            dt = work_dtype(tap.module.weight)
            delta = mine.pop(id(tap.out))
            if layer_type(tap.module) is nn.Linear:
                x, d = _shortcut_tensors(tap, dt, delta)
                sums = per_example_sums(x, d, tap.weight is not None, tap.bias is not None)
            else:
                A, Bm = factors(tap, dt, delta)
                sums = conv_per_example_sums(A, Bm, tap.weight is not None, tap.bias is not None,
                                             chunk_bytes)
            for key, idx in (("weight", tap.weight), ("bias", tap.bias)):
                if idx is None:
                    continue
                total, total_sq = sums[key]
                shape = prob.params[idx].shape
                out[prob.names[k]][idx] = _stats_from_sums(B, total.reshape(shape), total_sq.reshape(shape))

    gen = [prob.generic(k) for k in range(S)]
    rows = [_Row(k, slice(i, i + 1), 1.0, 1.0) for k in range(S) if gen[k] for i in range(prob.batch(k))]
    acc: dict[tuple[int, int], Accumulator] = {}
    _generic(prob, gen, rows, chunk_bytes, acc)
    for (k, i), a in acc.items():
        out[prob.names[k]][i] = a.stats()
    return out


@dataclass
class _Row:
    """One gradient sample: ``scale * sum(losses[k][examples])``, with frequency ``weight``."""

    k: int
    examples: slice
    scale: float
    weight: float


def _generic(prob: Problem, gen: list[list[int]], rows: list[_Row], chunk_bytes: int,
             acc: dict[tuple[int, int], Accumulator]) -> None:
    """Accumulate the gradient rows ``rows`` on the parameters ``gen[k]`` of each row's source.

    Rows are processed in batches of at most ``chunk_bytes`` of gradients, each
    batch one vectorised backward over all the sources it contains.
    """
    if not rows:
        return
    union = sorted(set().union(*[set(g) for g in gen]))
    per_row = sum(prob.params[i].numel() * prob.params[i].element_size() for i in union)
    R = max(1, int(chunk_bytes // max(per_row, 1)))
    for start in range(0, len(rows), R):
        chunk = rows[start:start + R]
        ks = sorted({r.k for r in chunk})
        cots = []
        for k in ks:
            l = prob.losses[k]
            c = torch.zeros((len(chunk), prob.batch(k)), dtype=l.dtype, device=l.device)
            for r, row in enumerate(chunk):
                if row.k == k:
                    c[r, row.examples] = row.scale
            cots.append(c)
        inputs = sorted(set().union(*[set(gen[k]) for k in ks]))
        grads = batched_grads([prob.losses[k] for k in ks], cots, [prob.params[i] for i in inputs])
        grads = _unaliased(grads)
        pos = {i: j for j, i in enumerate(inputs)}
        for k in ks:
            rs = [r for r, row in enumerate(chunk) if row.k == k]
            sl = slice(rs[0], rs[-1] + 1)  # rows of one source are contiguous
            weights = [chunk[r].weight for r in rs]
            for i in gen[k]:
                dt = work_dtype(prob.params[i])
                w = None if all(v == 1.0 for v in weights) else torch.tensor(
                    weights, dtype=dt, device=prob.params[i].device)
                acc.setdefault((k, i), Accumulator()).add(grads[pos[i]][sl].to(dt), w, owned=True)


def chunk_slices(B: int, chunks: int) -> list[slice]:
    """``min(chunks, B)`` contiguous, near-equal slices of ``range(B)``."""
    c = min(chunks, B)
    base, extra = divmod(B, c)
    sl, start = [], 0
    for j in range(c):
        size = base + (1 if j < extra else 0)
        sl.append(slice(start, start + size))
        start += size
    return sl


def microbatch(prob: Problem, chunks: int, chunk_bytes: int = 1 << 26) -> SourceStats:
    """Statistics of ``chunks`` micro-batch gradients per source.

    Chunk ``j`` of source ``k`` covers ``n_j`` contiguous examples; its sample
    is the gradient of the chunk's mean loss, weighted by ``f_j = n_j c / B``
    so that the statistics' mean is exactly the gradient of ``loss.mean()``
    even when ``B`` is not a multiple of ``c`` (equal chunks: unit weights).
    The chunks of all sources share batched backward passes.
    """
    S = len(prob.names)
    for k in range(S):
        _require(prob, k, 2, "two or more micro-batches")
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
    deltas = _delta_rows(prob, sc)
    for k in sc:
        mine = deltas.pop(k)
        f = torch.tensor([weight(k, j) for j in range(len(slices[k]))], dtype=torch.float64)
        unit = bool((f == 1).all())
        for tap in prob.shortcut[k]:
            dt = work_dtype(tap.module.weight)
            A, Bm = factors(tap, dt, mine.pop(id(tap.out)))
            fw = None if unit else f.to(dtype=dt, device=A.device)
            inv = [1.0 / (s_.stop - s_.start) for s_ in slices[k]]
            if tap.weight is not None:
                out_f, in_f = A.shape[2], Bm.shape[2]
                g = torch.empty((len(inv), out_f, in_f), dtype=dt, device=A.device)
                for j, (s_, a) in enumerate(zip(slices[k], inv)):
                    torch.mm(A[s_].reshape(-1, out_f).T, Bm[s_].reshape(-1, in_f), out=g[j]).mul_(a)
                g = g.reshape((len(inv),) + tuple(tap.module.weight.shape))
                acc.setdefault((k, tap.weight), Accumulator()).add(g, fw, owned=True)
                del g
            if tap.bias is not None:
                g = torch.stack([A[s_].sum(dim=(0, 1)).mul_(a) for s_, a in zip(slices[k], inv)])
                acc.setdefault((k, tap.bias), Accumulator()).add(g, fw, owned=True)

    gen = [prob.generic(k) for k in range(S)]
    rows = [
        _Row(k, s_, 1.0 / (s_.stop - s_.start), weight(k, j))
        for j in range(max(len(sl) for sl in slices))
        for k in range(S) if gen[k] and j < len(slices[k])
        for s_ in [slices[k][j]]
    ]
    # Source-major order keeps each source's rows contiguous within a batch.
    rows.sort(key=lambda r: r.k)
    _generic(prob, gen, rows, chunk_bytes, acc)
    for (k, i), a in acc.items():
        out[prob.names[k]][i] = a.stats()
    return out


def step_means(prob: Problem) -> dict[str, dict[int, torch.Tensor]]:
    """Each source's gradient of its mean loss (a scalar loss as is), in one backward."""
    S = len(prob.names)
    cots = []
    for k in range(S):
        l = prob.losses[k]
        c = torch.zeros((S,) + tuple(l.shape), dtype=l.dtype, device=l.device)
        c[k] = 1.0 / prob.batch(k) if l.dim() else 1.0
        cots.append(c)
    inputs = sorted(set().union(*prob.reach))
    grads = batched_grads(prob.losses, cots, [prob.params[i] for i in inputs])
    pos = {i: q for q, i in enumerate(inputs)}
    return {
        prob.names[k]: {i: grads[pos[i]][k].to(work_dtype(prob.params[i])) for i in sorted(prob.reach[k])}
        for k in range(S)
    }
