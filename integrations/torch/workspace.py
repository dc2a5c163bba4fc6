"""Flat statistic and gradient buffers: one fused calibration call per group of parameters.

Parameters reached by the same sources (in the same order), with the same
working dtype and device, form a *group*. A group's statistics live in two
flat buffers ``mean`` and ``m2`` of shape ``(S, D)`` (``D`` = the group's
parameter elements, tensor after tensor) and its calibrated gradient in one
``(D,)`` buffer, so the whole group is calibrated by one
:func:`bogc_core.calibrate_gradient` call: ``scope="tensor"`` passes one
segment per tensor, ``scope="global"`` the group as one segment. The buffers
are kept and reused while the set of groups stays the same; ``p.grad`` is
written from the gradient buffer only once the whole step has succeeded. The
gradient buffer is allocated when a step first writes it (after the
statistics, so it never adds to their peak) and, where it becomes the
parameters' ``p.grad`` itself (:meth:`Group.hand_over`), the next step
writes a new one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from bogc_core import CalibrationConfig, GradientStats, calibrate_gradient

from .samples import Stats, work_dtype

__all__ = ["Group", "Workspace"]


@dataclass
class Group:
    """Parameters reached by the same ``sources``, with their flat buffers.

    ``params[j]`` occupies ``[offsets[j], offsets[j] + sizes[j])`` of every
    buffer; ``mean``/``m2`` ``(S, D)``, ``out`` ``(D,)`` (``None`` until :meth:`output`
    allocates it); ``count`` is filled
    per step: one float per source, or an ``(S, D)`` buffer when a source's
    counts differ between the group's tensors (carried statistics).
    """

    sources: tuple[str, ...]
    params: list[int]
    sizes: list[int]
    offsets: list[int]
    mean: torch.Tensor
    m2: torch.Tensor
    out: torch.Tensor | None = None
    counts: list[float] = field(default_factory=list)
    count_buf: torch.Tensor | None = None
    #: per parameter, the diagnostics of the last :meth:`calibrate` that was asked for them
    summaries: list[dict[str, Any]] = field(default_factory=list)
    #: ``views[k][j]``: ``(mean, m2)`` of source ``k`` and parameter ``j`` in the parameter's
    #: shape (views of the buffers, made once per layout)
    views: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list, repr=False)
    _stats: dict[str, GradientStats] = field(default_factory=dict, repr=False)
    _stats_key: tuple[float, ...] | None = field(default=None, repr=False)

    def output(self) -> torch.Tensor:
        """The gradient buffer ``(D,)``, allocated on first use."""
        if self.out is None:
            self.out = torch.empty(self.mean.shape[1:], dtype=self.mean.dtype, device=self.mean.device)
        return self.out

    def hand_over(self) -> None:
        """The gradient buffer became ``p.grad`` (views of it): let go of it, so that the next
        step that writes a gradient allocates a new one."""
        self.out = None

    def piece(self, buf: torch.Tensor, j: int, shape: torch.Size) -> torch.Tensor:
        """The ``j``-th parameter's part of a ``(D,)`` buffer, in the parameter's shape."""
        return buf[self.offsets[j]:self.offsets[j] + self.sizes[j]].view(shape)

    def fill(self, used: Mapping[str, Mapping[int, Stats]]) -> None:
        """Copy each source's per-parameter statistics into the flat buffers (statistics a
        source already wrote there, through :meth:`Workspace.sink`, are not copied)."""
        counts: list[float | torch.Tensor] = []
        for k, s in enumerate(self.sources):
            per = used[s]
            for j, i in enumerate(self.params):
                st = per[i]
                for dst, t in zip(self.views[k][j], (st.mean, st.m2)):
                    if t is not dst and t.data_ptr() != dst.data_ptr():
                        dst.copy_(t.reshape(dst.shape))
                counts.append(st.count)
        self._set_counts(counts)

    def finite_sum(self) -> torch.Tensor:
        """A 0-d tensor that is finite exactly when no mean or M2 is NaN or infinite
        (or the sums overflow, which :meth:`nonfinite_params` then tells apart)."""
        return self.mean.sum() + self.m2.sum()

    def _nonfinite_pieces(self, ok: torch.Tensor) -> list[int]:
        """Index of every parameter whose part of the ``(D,)`` mask ``ok`` is not all true."""
        counts = ok.to(torch.int64)
        return [i for j, i in enumerate(self.params)
                if int(counts[self.offsets[j]:self.offsets[j] + self.sizes[j]].sum()) != self.sizes[j]]

    def nonfinite_output(self) -> list[int]:
        """Index of every parameter whose part of the gradient buffer holds a NaN or infinity."""
        return [] if self.out is None else self._nonfinite_pieces(torch.isfinite(self.out))

    def nonfinite_params(self) -> list[tuple[str, int]]:
        """``(source, parameter index)`` of every tensor with a NaN or infinite statistic."""
        return [(s, i) for k, s in enumerate(self.sources)
                for i in self._nonfinite_pieces(torch.isfinite(self.mean[k]) & torch.isfinite(self.m2[k]))]

    def _set_counts(self, counts: list[float | torch.Tensor]) -> None:
        P, S = len(self.params), len(self.sources)
        tensors = [j for j, c in enumerate(counts) if isinstance(c, torch.Tensor)]
        if all(counts[j].dim() == 0 for j in tensors):  # type: ignore[union-attr]
            values = [float(c) if not isinstance(c, torch.Tensor) else 0.0 for c in counts]
            if tensors:  # one host sync for all of them
                got = torch.stack([counts[j].to(torch.float64).cpu() for j in tensors]).tolist()  # type: ignore[union-attr]
                for j, v in zip(tensors, got):
                    values[j] = v
            per_src = [values[k * P:(k + 1) * P] for k in range(S)]
            if all(min(v) == max(v) for v in per_src):
                self.counts = [v[0] for v in per_src]
                self.count_buf = None
                return
        # Counts that differ between tensors (or per element): one count per element.
        buf = torch.empty_like(self.mean)
        for k in range(S):
            for j in range(P):
                c = torch.as_tensor(counts[k * P + j]).to(buf.dtype)
                buf[k, self.offsets[j]:self.offsets[j] + self.sizes[j]] = c.reshape(-1) if c.dim() else c
        self.count_buf = buf
        self.counts = [float(buf[k].min()) for k in range(S)]

    def min_count(self) -> float:
        return min(self.counts)

    def stats(self) -> dict[str, GradientStats]:
        """The group's statistics as flat ``GradientStats`` (views of the buffers); kept
        while the counts stay the same, since they view the same buffers every step."""
        key = tuple(self.counts) if self.count_buf is None else None
        if key is None or key != self._stats_key:
            self._stats = {
                s: GradientStats(
                    self.counts[k] if self.count_buf is None else self.count_buf[k], self.mean[k], self.m2[k]
                )
                for k, s in enumerate(self.sources)
            }
            self._stats_key = key
        return self._stats

    def plain(self, lam: Mapping[str, float] | None, scale: float) -> None:
        """``out = scale * sum_k lambda_k mean_k`` (one source, warm-up, or a non-finite step)."""
        out = self.output()
        for k, s in enumerate(self.sources):
            a = (1.0 if lam is None else lam[s]) * scale
            if k == 0:
                torch.mul(self.mean[0], a, out=out)
            else:
                out.add_(self.mean[k], alpha=a)

    def calibrate(self, config: CalibrationConfig, lam: Mapping[str, float] | None, scale: float,
                  diagnostics: dict[str, Any] | None, check: bool = False) -> None:
        """One :func:`bogc_core.calibrate_gradient` call for the whole group, into ``out``.

        With a ``diagnostics`` dict, the same call also leaves one diagnostics dict per
        parameter in :attr:`summaries` (by-products of the passes: no second calibration).
        ``check``: the call makes the values check of the statistics and of the gradient
        (the compiled loops fold it into the passes that read and write them), raising
        :class:`~bogc_core.errors.NonFiniteError` on a NaN or infinity."""
        segments = self.sizes if config.scope == "tensor" and len(self.sizes) > 1 else None
        out = self.output()
        calibrate_gradient(
            self.stats(), config,
            source_weights=None if lam is None else {s: lam[s] for s in self.sources},
            out=out, segments=segments, diagnostics=diagnostics,
            summarize=False if diagnostics is None else list(self.sizes), check_values=check,
        )
        if diagnostics is not None:
            self.summaries = diagnostics.pop("segments")
        if scale != 1.0:
            out.mul_(scale)


class Workspace:
    """The groups of the last step's layout, with buffers reused while the layout holds."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self._params = params
        self._key: tuple | None = None
        self.groups: list[Group] = []
        self._views: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def layout(self, sources_of: Mapping[int, tuple[str, ...]]) -> list[Group]:
        """Groups for ``sources_of`` (parameter index -> the sources reaching it, in order)."""
        # The working dtype and device are part of the key: after model.double() (or
        # .to(device)) the buffers follow the parameters.
        key = tuple(
            (i, srcs, work_dtype(self._params[i]), self._params[i].device)
            for i, srcs in sorted(sources_of.items())
        )
        if key == self._key:
            return self.groups
        members: dict[tuple, list[int]] = {}
        for i in sorted(sources_of):
            p = self._params[i]
            members.setdefault((sources_of[i], work_dtype(p), p.device), []).append(i)
        groups = []
        for (sources, dt, dev), idx in members.items():
            sizes = [self._params[i].numel() for i in idx]
            offsets = [0]
            for n in sizes[:-1]:
                offsets.append(offsets[-1] + n)
            D, S = sum(sizes), len(sources)
            groups.append(Group(
                sources, idx, sizes, offsets,
                torch.empty((S, D), dtype=dt, device=dev),
                torch.empty((S, D), dtype=dt, device=dev),
            ))
        self._key, self.groups = key, groups
        # Views are made once per layout: the buffers live as long as it holds.
        for g in groups:
            g.views = [[(g.piece(g.mean[k], j, self._params[i].shape),
                         g.piece(g.m2[k], j, self._params[i].shape)) for j, i in enumerate(g.params)]
                       for k in range(len(g.sources))]
        self._views = {(s, i): g.views[k][j] for g in groups for k, s in enumerate(g.sources)
                       for j, i in enumerate(g.params)}
        return groups

    def sink(self, source: str, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views ``(mean, m2)`` in the parameter's shape where a sample source may write
        source ``source``'s statistics of parameter ``index`` directly; ``None`` when the
        current layout has no place for them."""
        return self._views.get((source, index))

    def grad_views(self) -> list[tuple[Group, int, torch.Tensor]]:
        """``(group, parameter index, its part of the group's gradient buffer in its shape)``
        for every parameter of the layout."""
        return [(g, i, g.piece(g.output(), j, self._params[i].shape))
                for g in self.groups for j, i in enumerate(g.params)]

    def release(self) -> None:
        """Drop the buffers (the next step allocates them again)."""
        self._key, self.groups, self._views = None, [], {}
