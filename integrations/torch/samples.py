"""Machinery shared by the sample sources (``docs/method.md``, Stage 0).

Every sample source takes a :class:`Problem` (the step's losses, the
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

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from bogc_core import GradientStats
from bogc_core.errors import InsufficientSamplesError

from .accumulate import Accumulator, Moments
from .shortcut import Tap

__all__ = [
    "Moments", "Problem", "Row", "SourceStats", "Stats", "batched_grads", "chunk_slices", "generic_rows",
    "require_examples", "stats_from_sums", "unaliased", "use_deltas", "work_dtype",
]

Stats = Moments | GradientStats
SourceStats = dict[str, dict[int, Stats]]


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
        covered: set[int] = set()
        for tap in (self.shortcut[k] if self.shortcut else []):
            covered.update(i for i in (tap.weight, tap.bias) if i is not None)
        return sorted(self.reach[k] - covered)

    def batch(self, k: int) -> int:
        return int(self.losses[k].shape[0]) if self.losses[k].dim() else 1


def _is_vmap_randomness(exc: RuntimeError) -> bool:
    return "random operations inside of vmap" in str(exc)


def batched_grads(
    losses: list[torch.Tensor], cotangents: list[torch.Tensor], inputs: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Gradients of ``sum_k <cotangents[k][r], losses[k]>`` w.r.t. ``inputs`` for every row ``r``.

    ``cotangents[k]`` has shape ``(R, *losses[k].shape)``; returns one tensor
    ``(R, *inputs[i].shape)`` per input, from a single (vectorised) backward,
    or from ``R`` backward passes when the backward draws random numbers (a
    checkpointed forward with dropout, recomputed inside the backward: vmap
    cannot draw them, and the checkpoint replays the forward's random state
    in each pass, so every row sees the forward's masks).
    """
    R = int(cotangents[0].shape[0])
    if R > 1:
        try:
            return list(
                torch.autograd.grad(
                    losses, inputs, grad_outputs=cotangents, retain_graph=True, allow_unused=True,
                    is_grads_batched=True, materialize_grads=True,
                )
            )
        except RuntimeError as exc:
            if not _is_vmap_randomness(exc):
                raise
    rows = [
        torch.autograd.grad(
            losses, inputs, grad_outputs=[c[r] for c in cotangents],
            retain_graph=True, allow_unused=True, materialize_grads=True,
        )
        for r in range(R)
    ]
    return [torch.stack([row[j] for row in rows]) for j in range(len(inputs))]


def stats_from_sums(n: float, total: torch.Tensor, total_sq: torch.Tensor) -> Moments:
    """``GradientStats.from_sums`` for fresh buffers, in place: ``m = total / n``,
    ``M2 = max(sum g^2 - total * m, 0)`` (float32 loses about ``eps * n * m^2``;
    see the bound tested in ``test_linear_shortcut_sums_match_materialised``)."""
    mean = total.div_(n)
    m2 = total_sq.addcmul_(mean, mean, value=-n).clamp_(min=0.0)
    return Moments(float(n), mean, m2)


def unaliased(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the gradients that share storage with another (autograd may hand the same
    tensor to two inputs), so that each can be overwritten in place."""
    seen: set[int] = set()
    out = []
    for g in grads:
        ptr = g.untyped_storage().data_ptr()
        out.append(g.clone() if ptr in seen else g)
        seen.add(ptr)
    return out


def require_examples(prob: Problem, k: int, at_least: int, what: str) -> None:
    if prob.batch(k) < at_least:
        raise InsufficientSamplesError(
            f"losses[{prob.names[k]!r}]: {prob.batch(k)} example(s) cannot give {what}; pass a "
            f"per-example loss vector of at least {at_least} examples (reduction='none'), or use "
            f"samples='steps' to accumulate one gradient per step"
        )


def use_deltas(prob: Problem, sources: list[int], use: Callable[[int, Tap, torch.Tensor], None]) -> None:
    """``use(k, tap, delta)`` for every shortcut layer call ``tap`` of every source ``k`` in
    ``sources``, with ``delta = d loss_k.sum() / d tap.out`` ``(N, out)``.

    One backward per source, walking only to the layers the source's shortcut uses (a
    source that does not reach a layer costs nothing there). An output with another of
    the source's layers below it is used by a hook as the backward passes it, and freed
    once passed on; only the lowest outputs, which the backward returns, wait for its
    end. So few layers' output gradients are alive at a time rather than all of a
    source's. ``use`` must not keep ``delta`` or change it in place: the backward passes
    it on once ``use`` returns."""
    # One backward per source rather than one vmapped backward for all: it works under
    # gradient checkpointing with dropout (vmap cannot draw random numbers), and node
    # hooks see plain tensors.
    for k in sources:
        if prob.shortcut[k]:
            _source_deltas(prob, k, partial(use, k))


def _source_deltas(prob: Problem, k: int, use: Callable[[Tap, torch.Tensor], None]) -> None:
    """:func:`use_deltas` for the one source ``k``."""
    taps = {id(tap.out): tap for tap in prob.shortcut[k]}
    lowest = _lowest([t.out for t in taps.values() if t.via is None])
    done: set[int] = set()

    def take(tap: Tap, delta: torch.Tensor) -> None:
        done.add(id(tap.out))
        use(tap, delta)

    handles = []
    for tid, tap in taps.items():
        if tap.via is not None:
            # A row broadcast over the batch: the per-example gradient is the one of the
            # node adding it to a batched tensor.
            handles.append(tap.via.register_prehook(lambda grads, tap=tap: take(tap, grads[0])))
        elif tid not in lowest:
            node = tap.out.grad_fn
            assert node is not None  # a layer output without one is among the lowest
            handles.append(node.register_prehook(lambda grads, tap=tap: _take_output(take, tap, grads)))
    ins = [tap for tid, tap in taps.items() if tap.via is not None or tid in lowest]
    l = prob.losses[k]
    try:
        grads = torch.autograd.grad(l, [tap.out for tap in ins], grad_outputs=torch.ones_like(l),
                                    retain_graph=True, allow_unused=True, materialize_grads=True)
    finally:
        for h in handles:
            h.remove()
    for tap, g in zip(ins, grads):
        if id(tap.out) not in done:
            take(tap, g)
    del grads
    # Layers that the source's loss does not reach through the graph.
    for tid, tap in taps.items():
        if tid not in done:
            take(tap, torch.zeros_like(tap.out))


def _take_output(take: Callable[[Tap, torch.Tensor], None], tap: Tap, grads: tuple) -> None:
    """A node pre-hook's share for ``tap``: the gradient of the node's output ``tap.out``
    (``None`` where the backward gives that output none)."""
    g = grads[tap.out.output_nr]
    if g is not None:
        take(tap, g)


def _lowest(outs: list[torch.Tensor]) -> set[int]:
    """``id`` of each tensor of ``outs`` whose graph, walked towards the inputs, reaches no
    other one's ``grad_fn``: the backward passes every other one on its way to these."""
    marked = {o.grad_fn for o in outs if o.grad_fn is not None}
    dead: set[object] = set()  # nodes with no marked node at or below them

    def below(node: Any) -> bool:
        seen: set[object] = set()
        stack = [c for c, _ in node.next_functions if c is not None]
        while stack:
            n = stack.pop()
            if n in marked:
                return True
            if n not in dead and n not in seen:
                seen.add(n)
                stack.extend(c for c, _ in n.next_functions if c is not None)
        dead.update(seen)  # walked to the end without meeting a marked node
        return False

    return {id(o) for o in outs if o.grad_fn is None or not below(o.grad_fn)}


@dataclass
class Row:
    """One gradient sample: ``scale * sum(losses[k][examples])``, with frequency ``weight``."""

    k: int
    examples: slice
    scale: float
    weight: float


def generic_rows(prob: Problem, gen: list[list[int]], rows: list[Row], chunk_bytes: int,
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
        grads = unaliased(grads)
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
