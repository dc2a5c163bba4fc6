"""Weighted running statistics of gradient samples in torch (Chan/West merging).

Samples ``g_j`` with frequency weights ``f_j`` are summarised by
``W = sum_j f_j``, ``m = sum_j f_j g_j / W`` and
``M2 = sum_j f_j (g_j - m)^2``. With unit weights these are the ``(n, m, M2)``
of :class:`bogc_core.GradientStats`. Weights appear only for micro-batches of
unequal size (``f_j = n_j * c / n``), so that the mean stays the gradient of
the mean loss over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bogc_core import GradientStats

__all__ = ["Accumulator", "Moments"]


@dataclass(frozen=True, slots=True)
class Moments:
    """``(n, m, M2)`` of one source's samples for one tensor, unchecked.

    The integration's own record of a step's statistics: building a
    :class:`~bogc_core.GradientStats` validates its inputs, which costs more
    than the arithmetic for small tensors, so the sources return these and the
    core sees checked ``GradientStats`` of whole flat groups only.
    """

    count: float | torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    def checked(self) -> GradientStats:
        return GradientStats(self.count, self.mean, self.m2)


class Accumulator:
    """Running ``(W, m, M2)`` of one source's samples for one parameter tensor.

    Each :meth:`add` merges a batch of rows exactly (Chan et al.), so the
    result does not depend on how the samples were split into batches, up to
    floating-point rounding.
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self) -> None:
        self.count = 0.0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, weights: torch.Tensor | None = None, owned: bool = False) -> None:
        """Merge ``rows`` of shape ``(R, *shape)``; ``weights`` ``(R,)`` or ``None`` (ones).

        ``owned=True`` lets the merge overwrite ``rows`` (a buffer the caller
        no longer needs), which saves two temporaries of its size.
        """
        if weights is None:
            wb = float(rows.shape[0])
            mb = rows.mean(dim=0)
        else:
            w = weights.to(rows.dtype)
            wb = float(w.sum())
            mb = torch.tensordot(w, rows, dims=1) / wb
        d = rows.sub_(mb) if owned else rows - mb
        d = d.mul_(d)
        m2b = d.sum(dim=0) if weights is None else torch.tensordot(w, d, dims=1)
        self.add_moments(wb, mb, m2b)

    def add_moments(self, count: float, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge a batch already summarised as ``(count, mean, M2)``."""
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = float(count), mean, m2
            return
        n = self.count + count
        frac = count / n
        delta = mean - self.mean
        self.mean = self.mean + delta * frac
        self.m2 = self.m2 + m2 + (delta * delta) * (self.count * frac)
        self.count = n

    def stats(self) -> Moments:
        if self.mean is None or self.m2 is None:
            raise RuntimeError("Accumulator.stats: no samples were added")
        return Moments(self.count, self.mean, self.m2)
