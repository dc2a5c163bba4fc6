"""Collectives of the calibrator over a ``torch.distributed`` process group.

Two things happen on every step in a process group (``docs/distributed.md``):

1. **Agreement.** Before any gradient sample is taken, every rank
   contributes a fixed-size fingerprint (:data:`FINGERPRINT` int64 values:
   step counter, local status, hashes of the source names, of the sources
   with an empty loss, of the parameters each source reaches, of the dtypes
   and shapes, and of the sampling options) to one ``all_gather``. Equal
   fingerprints, the common case, cost nothing more. Otherwise every rank
   holds the same gathered fingerprints, so every rank takes the same second,
   rare ``all_gather_object`` of the readable details and reaches the same
   :func:`verdict`: either the same :class:`~bogc_core.DistributedError` on
   every rank, or (sources with an empty loss on some rank) the same set of
   sources sitting the step out on every rank.
2. **Statistics.** Each rank's statistics are converted to the sums form
   ``(n, sum g, sum g^2)`` (which adds across ranks), packed into ONE flat
   float64 buffer with one trailing failure flag per rank, and reduced with a
   single ``all_reduce``; every rank then holds the statistics of the global
   batch. A rank whose sampling failed still joins the all-reduce (with zeros
   and its flag set), so that every rank raises instead of waiting. float64
   keeps ``M2 = sum g^2 - (sum g)^2 / n`` accurate to about
   ``1e-16 * n * m^2``, far below float32 resolution.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from bogc_core import GradientStats
from bogc_core.errors import DistributedError

__all__ = [
    "DistributedError",
    "FINGERPRINT",
    "Agreement",
    "LocalView",
    "active_group",
    "allreduce_stats",
    "allreduce_sum",
    "verdict",
]

#: Length of the per-rank fingerprint (int64 values).
FINGERPRINT = 8
_MAGIC = 0x0B06C


def active_group(process_group: Any) -> Any:
    """The group to reduce over, or ``None`` when running in a single process."""
    import torch.distributed as dist

    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _where(group: Any) -> str:
    import torch.distributed as dist

    return f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"


def _wait(work: Any, group: Any, timeout: timedelta | None, what: str) -> None:
    import torch.distributed as dist

    try:
        ok = work.wait() if timeout is None else work.wait(timeout)
    except Exception as exc:  # gloo/nccl raise RuntimeError subclasses of many kinds
        raise DistributedError(
            f"GradientCalibrator.backward: the {what} failed on {_where(group)} "
            f"({type(exc).__name__}: {exc}). A peer process probably died or did not reach "
            f"backward within the process group's timeout (or timeout=); every rank must call "
            f"backward once per step"
        ) from exc
    if ok is False:
        raise DistributedError(
            f"GradientCalibrator.backward: the {what} timed out on {_where(group)}; a peer did "
            f"not reach backward in time (rank {dist.get_rank(group)} waited; raise timeout= or "
            f"find why the peer stalled)"
        )


def _start(fn: Any, group: Any, timeout: timedelta | None, what: str) -> None:
    try:
        work = fn()
    except Exception as exc:
        raise DistributedError(
            f"GradientCalibrator.backward: the {what} could not start on {_where(group)} "
            f"({type(exc).__name__}: {exc}); a peer process probably died"
        ) from exc
    _wait(work, group, timeout, what)


def _run(buf: torch.Tensor, group: Any, timeout: timedelta | None, what: str) -> None:
    import torch.distributed as dist

    _start(lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True),
           group, timeout, f"all-reduce of {what}")


# ---------------------------------------------------------------- agreement
def _h(obj: object) -> int:
    """A 56-bit hash of ``repr(obj)``, equal in every process (``hash()`` is salted)."""
    return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=7).digest(), "little")


@dataclass
class LocalView:
    """What one rank is about to do this step, as plain Python values.

    ``reach[source]``: names of the parameters the source's loss reaches
    (sources with an empty loss are left out); ``tensors``: the dtype and
    shape of each reached parameter and of each loss; ``error``: the local
    error of this rank (``None`` when it is ready).

    ``keys``: precomputed hashes of ``reach`` and ``tensors`` (see
    :meth:`Agreement.keys`); when given, the readable ``reach`` and
    ``tensors`` are filled only if the ranks disagree (they cost a string
    per parameter, too much for every step of a large model).
    """

    step: int
    names: list[str]
    empty: list[str]
    reach: dict[str, list[str]] = field(default_factory=dict)
    tensors: dict[str, str] = field(default_factory=dict)
    options: str = ""
    error: str | None = None
    keys: tuple[int, int] | None = None

    def fingerprint(self) -> list[int]:
        if self.keys is not None:
            reach, tensors = self.keys
        else:
            reach = _h(sorted((s, sorted(r)) for s, r in self.reach.items()))
            tensors = _h(sorted(self.tensors.items()))
        return [
            _MAGIC,
            self.step,
            0 if self.error is None else 1,
            _h(sorted(self.names)),
            _h(sorted(self.empty)),
            reach,
            tensors,
            _h(self.options),
        ]


def _diff(views: Sequence[Mapping[str, Any]], key: str) -> str:
    return "; ".join(f"rank {r}: {v[key]!r}" for r, v in enumerate(views))


def verdict(views: Sequence[Mapping[str, Any]]) -> tuple[str | None, set[str]]:
    """The common decision of every rank from every rank's :class:`LocalView` (as dicts).

    Returns ``(message, sit_out)``: ``message`` is the text of the
    :class:`~bogc_core.DistributedError` every rank raises, or ``None``;
    ``sit_out`` the sources that sit this step out on every rank because
    their loss is empty on at least one rank. A pure function of its input,
    so that ranks holding the same views decide the same.
    """
    head = "GradientCalibrator.backward: the ranks of the process group disagree: "
    failed = [(r, v["error"]) for r, v in enumerate(views) if v["error"] is not None]
    if failed:
        return (
            "GradientCalibrator.backward: "
            + "; ".join(f"rank {r} failed before the collective ({e})" for r, e in failed)
            + ". Every rank raises this error; fix the failing rank's input (the other ranks' "
            "inputs were fine)",
            set(),
        )
    if len({v["step"] for v in views}) > 1:
        return (head + f"step counters differ ({_diff(views, 'step')}). Every rank must call "
                "backward once per step, and all ranks must build (or load) their calibrators "
                "together", set())
    if len({v["options"] for v in views}) > 1:
        return (head + f"calibrator options differ ({_diff(views, 'options')}). Build the "
                "calibrator with the same samples= (and its options), source_weights= and config "
                "on every rank", set())
    names = [sorted(v["names"]) for v in views]
    if any(n != names[0] for n in names):
        every = set(names[0]).intersection(*names[1:])
        odd = {r: sorted(set(n) - every) for r, n in enumerate(names) if set(n) - every}
        return (head + f"source names differ ({'; '.join(f'rank {r}: {n}' for r, n in enumerate(names))}; "
                f"not on every rank: {odd}). Pass the same source names on every rank (an empty "
                "loss vector, shape (0,), for a source without examples on a rank)", set())
    sit_out = set().union(*[set(v["empty"]) for v in views])
    kept = [n for n in names[0] if n not in sit_out]
    if not kept:
        return ("GradientCalibrator.backward: every source has an empty loss on some rank "
                f"(empty: {_diff(views, 'empty')}), so no source is left for this step on any "
                "rank. Give every rank examples of at least one common source, or skip the step "
                "on every rank", sit_out)
    for s in kept:
        reach = [sorted(v["reach"].get(s, [])) for v in views]
        if any(r != reach[0] for r in reach):
            detail = "; ".join(
                f"rank {r}: only {sorted(set(x) - set(reach[0]))}, missing {sorted(set(reach[0]) - set(x))}"
                for r, x in enumerate(reach) if x != reach[0]
            )
            return (head + f"source {s!r} reaches different parameters (compared with rank 0: "
                    f"{detail}). Run the same model code on every rank, so that each source's loss "
                    "depends on the same parameters everywhere", sit_out)
    # Only what the kept sources use must agree (a source sitting out may differ).
    keys = sorted({f"loss {s}" for s in kept}.union(*[views[0]["reach"].get(s, []) for s in kept]))
    tens = [{k: v["tensors"].get(k) for k in keys} for v in views]
    if any(t != tens[0] for t in tens):
        bad = [k for k in keys if len({str(t.get(k)) for t in tens}) > 1]
        return (head + "dtypes or shapes differ: " + "; ".join(
            f"{k}: " + ", ".join(f"rank {r} {t.get(k)}" for r, t in enumerate(tens)) for k in bad[:4]
        ) + ". Build the same model in the same dtype on every rank", sit_out)
    return None, sit_out


class Agreement:
    """The per-step agreement check of one calibrator (one ``all_gather`` when all agree)."""

    def __init__(self) -> None:
        #: ``backward`` calls that reached the check (every rank counts the same).
        self.step = 0
        # id(tensor) -> (tensor, its "index:dtype:shape;" bytes), taken at the tensor's
        # first step (a parameter keeps its shape and dtype); the tensor is kept so that
        # its id cannot be reused.
        self._meta: dict[int, tuple[torch.Tensor, bytes]] = {}

    def keys(self, names: Sequence[str], reach: Sequence[Iterable[int]], losses: Sequence[torch.Tensor],
             params: Sequence[torch.Tensor]) -> tuple[int, int]:
        """Hashes of what each source reaches and of the dtypes and shapes involved.

        ``reach[k]``: parameter indices that source ``names[k]`` reaches;
        ``params[i]``: the tensor of parameter ``i``. Equal on two ranks
        exactly when their readable ``reach`` and ``tensors`` are (up to hash
        collisions, about 2**-56), at the cost of bytes per parameter only.
        """
        hr = hashlib.blake2b(digest_size=7)
        ht = hashlib.blake2b(digest_size=7)
        used: set[int] = set()
        for s, r, l in sorted(zip(names, reach, losses), key=lambda x: x[0]):
            idx = sorted(r)
            used.update(idx)
            hr.update(s.encode() + b"\0" + array("q", idx).tobytes() + b"\0")
            ht.update(f"loss {s}:{l.dtype};".encode())
        for i in sorted(used):
            t = params[i]
            hit = self._meta.get(id(t))
            if hit is None or hit[0] is not t:
                hit = self._meta[id(t)] = (t, f"{i}:{t.dtype}:{tuple(t.shape)};".encode())
            ht.update(hit[1])
        return (int.from_bytes(hr.digest(), "little"), int.from_bytes(ht.digest(), "little"))

    def check(self, view: LocalView, group: Any, timeout: timedelta | None,
              details: Callable[[], None] | None = None) -> set[str]:
        """Sources that sit the step out on every rank; raises the common error if any.

        ``view.step`` is overwritten with this calibrator's counter, which
        advances once per call whatever the outcome, on every rank.
        ``details`` fills ``view.reach`` and ``view.tensors`` when the ranks
        disagree (with ``view.keys`` set, they may be left empty until then).
        """
        import torch.distributed as dist

        view.step = self.step
        self.step += 1
        world = dist.get_world_size(group)
        mine = torch.tensor(view.fingerprint(), dtype=torch.int64)
        if dist.get_backend(group) == "nccl":  # nccl only moves device tensors
            mine = mine.to(torch.device("cuda", torch.cuda.current_device()))
        bufs = [torch.empty_like(mine) for _ in range(world)]
        _start(lambda: dist.all_gather(bufs, mine, group=group, async_op=True),
               group, timeout, "agreement check (all_gather)")
        rows = [tuple(b.tolist()) for b in bufs]
        if all(r == rows[0] for r in rows) and rows[0][2] == 0:
            return set()
        if details is not None and view.error is None:
            try:
                details()
            except Exception as exc:  # still join the exchange, reported like a local failure
                view.error = f"{type(exc).__name__}: {exc}"
        views: list[Any] = [None] * world
        send = {k: v for k, v in view.__dict__.items() if k != "keys"}
        try:
            dist.all_gather_object(views, send, group=group)
        except Exception as exc:
            raise DistributedError(
                f"GradientCalibrator.backward: the ranks disagree and the details could not be "
                f"exchanged on {_where(group)} ({type(exc).__name__}: {exc}); a peer probably died"
            ) from exc
        message, sit_out = verdict(views)
        if message is not None:
            raise DistributedError(message)
        return sit_out


# --------------------------------------------------------------- statistics
Layout = list[tuple[str, int, tuple[int, ...]]]


def stats_layout(reach: Mapping[str, Iterable[int]], shapes: Sequence[tuple[int, ...]]) -> Layout:
    """``(source, parameter index, shape)`` of every statistic, in the order all ranks pack them."""
    return [(s, i, tuple(shapes[i])) for s in sorted(reach) for i in sorted(reach[s])]


def allreduce_stats(
    stats: dict[str, dict[int, GradientStats]] | None, group: Any, timeout: timedelta | None = None,
    *, layout: Layout | None = None, failure: BaseException | None = None,
) -> dict[str, dict[int, GradientStats]]:
    """Statistics of the union of every rank's samples (one bucketed all-reduce).

    ``stats[source][param]`` must have the same keys and shapes on every rank
    (the agreement check makes sure). A rank whose sampling failed passes
    ``stats=None``, its ``layout`` and the ``failure``: it joins the
    all-reduce with zeros, and every rank then raises the same
    :class:`~bogc_core.DistributedError`. Returns new statistics in each
    input's dtype.
    """
    import torch.distributed as dist

    if stats is not None:
        layout = [(s, i, tuple(stats[s][i].mean.shape)) for s in sorted(stats) for i in sorted(stats[s])]
    assert layout is not None
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = torch.device("cpu")
    if stats is not None and layout:
        dev = stats[layout[0][0]][layout[0][1]].mean.device
    elif dist.get_backend(group) == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    flags = torch.zeros(world, dtype=torch.float64, device=dev)
    if failure is not None:
        flags[rank] = 1.0
    parts = []
    for s, i, shape in layout:
        if stats is None:
            size = 1 + 2 * int(torch.Size(shape).numel())
            parts.append(torch.zeros(size, dtype=torch.float64, device=dev))
            continue
        n, tot, sq = stats[s][i].to_sums()
        parts += [torch.as_tensor(n, dtype=torch.float64).reshape(1).to(dev),
                  tot.to(torch.float64).reshape(-1), sq.to(torch.float64).reshape(-1)]
    buf = torch.cat(parts + [flags])
    _run(buf, group, timeout, "gradient statistics")
    failed = [r for r, f in enumerate(buf[-world:].tolist()) if f != 0.0]
    if failed:
        msg = (
            f"GradientCalibrator.backward: taking the gradient samples failed on rank(s) {failed} "
            f"of {world}"
            + (f" (here: {type(failure).__name__}: {failure})" if failure is not None else "")
            + "; every rank raises this error and no p.grad changed. Fix the failing rank's input"
        )
        raise DistributedError(msg) from failure
    assert stats is not None
    out: dict[str, dict[int, GradientStats]] = {s: {} for s in stats}
    pos = 0
    for s, i, _shape in layout:
        st = stats[s][i]
        size = st.mean.numel()
        n = buf[pos]
        tot = buf[pos + 1:pos + 1 + size].reshape(st.mean.shape)
        sq = buf[pos + 1 + size:pos + 1 + 2 * size].reshape(st.mean.shape)
        pos += 1 + 2 * size
        g = GradientStats.from_sums(n, tot, sq)
        dt = st.mean.dtype
        out[s][i] = GradientStats(g.count.to(dt), g.mean.to(dt), g.m2.to(dt))
    return out


def allreduce_sum(tensors: list[torch.Tensor], group: Any, timeout: timedelta | None = None) -> list[torch.Tensor]:
    """Sums over ranks of ``tensors`` (one bucketed all-reduce, float64); returns new tensors."""
    if not tensors:
        return []
    buf = torch.cat([t.to(torch.float64).reshape(-1) for t in tensors])
    _run(buf, group, timeout, "tensors")
    out, pos = [], 0
    for t in tensors:
        out.append(buf[pos:pos + t.numel()].reshape(t.shape).to(t.dtype))
        pos += t.numel()
    return out
