"""All-reduce of per-source gradient statistics over a ``torch.distributed`` process group.

Each rank's statistics are converted to the sums form ``(n, sum g, sum g^2)``
(which adds across ranks), packed into ONE flat float64 buffer, reduced with a
single ``all_reduce`` and converted back, so that every rank holds the
statistics of the global batch. float64 keeps the conversion
``M2 = sum g^2 - (sum g)^2 / n`` accurate to about ``1e-16 * n * m^2``, far
below float32 resolution.
"""

from __future__ import annotations

from datetime import timedelta

import torch

from bogc_core import GradientStats

__all__ = ["DistributedError", "active_group", "allreduce_stats"]


class DistributedError(RuntimeError):
    """A collective of the calibrator failed or timed out (a peer died or diverged)."""


def active_group(process_group):
    """The group to reduce over, or ``None`` when running in a single process."""
    import torch.distributed as dist

    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _run(buf: torch.Tensor, group, timeout: timedelta | None, what: str) -> None:
    import torch.distributed as dist

    try:
        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)
        ok = work.wait() if timeout is None else work.wait(timeout)
    except Exception as exc:  # gloo/nccl raise RuntimeError subclasses of many kinds
        raise DistributedError(
            f"GradientCalibrator.backward: the all-reduce of {what} failed on rank "
            f"{dist.get_rank(group)} of {dist.get_world_size(group)} ({type(exc).__name__}: "
            f"{exc}). A peer process probably died, timed out, or called backward with "
            f"different sources or parameters; every rank must call backward with the same "
            f"source names on the same model"
        ) from exc
    if ok is False:
        raise DistributedError(
            f"GradientCalibrator.backward: the all-reduce of {what} timed out on rank "
            f"{dist.get_rank(group)}; a peer did not reach backward in time"
        )


def allreduce_stats(
    stats: dict[str, dict[int, GradientStats]], group, timeout: timedelta | None = None
) -> dict[str, dict[int, GradientStats]]:
    """Statistics of the union of every rank's samples (one bucketed all-reduce).

    ``stats[source][param]`` must have the same keys and shapes on every rank.
    Returns new statistics in each input's dtype.
    """
    keys = [(s, i) for s in sorted(stats) for i in sorted(stats[s])]
    if not keys:
        return stats
    dev = stats[keys[0][0]][keys[0][1]].mean.device
    parts = []
    for s, i in keys:
        n, tot, sq = stats[s][i].to_sums()
        parts += [torch.as_tensor(n, dtype=torch.float64).reshape(1).to(dev),
                  tot.to(torch.float64).reshape(-1), sq.to(torch.float64).reshape(-1)]
    buf = torch.cat(parts)
    _run(buf, group, timeout, "gradient statistics")
    out: dict[str, dict[int, GradientStats]] = {s: {} for s in stats}
    pos = 0
    for s, i in keys:
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


def allreduce_sum(tensors: list[torch.Tensor], group, timeout: timedelta | None = None) -> list[torch.Tensor]:
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
