"""FALLBACK ONLY: a minimal micro-batch BOGC step built directly on the core.

Used by :mod:`.bogc_method` only when ``bogc_core.integrations.torch`` does
not export ``GradientCalibrator`` (the real integration). It implements the
``samples="microbatch"`` route of METHOD.md and nothing else: the batch is
split into ``chunks`` equal parts; for each chunk ``c`` and source ``k`` the
gradient of the chunk's mean loss is one sample ``g_k^(c)``; per parameter
tensor and source, ``GradientStats.from_samples`` gives ``(n, m, M2)`` and
:func:`bogc_core.calibrate_tensors` the calibrated update, written to
``p.grad``. With equal evidence it equals the gradient of
``sum_k mean(loss_k)``.
"""

from __future__ import annotations

from typing import Any

import torch

from bogc_core import CalibrationConfig, GradientStats, calibrate_tensors


class MicrobatchCalibrator:
    """``MicrobatchCalibrator(groups, config, chunks)``; ``groups`` as
    :meth:`MultiModalNet.param_groups` returns: ``[(params, sources), ...]``."""

    def __init__(self, groups, config: CalibrationConfig | None = None, chunks: int = 4):
        self.groups = groups
        self.config = config or CalibrationConfig()
        self.chunks = chunks

    def backward(self, losses: dict[str, torch.Tensor]) -> dict[str, Any]:
        B = next(iter(losses.values())).shape[0]
        parts = torch.arange(B).tensor_split(min(self.chunks, B))
        # Single-source tensors take their plain gradient (nothing to weigh), as
        # the PyTorch integration does.
        for group, srcs in self.groups:
            if len(srcs) == 1:
                gs = torch.autograd.grad(losses[srcs[0]].mean(), group, retain_graph=True)
                for p, g in zip(group, gs):
                    p.grad = g.detach().clone()
        multi = [(g, s) for g, s in self.groups if len(s) > 1]
        params = [p for g, _ in multi for p in g]
        samples: dict[str, list[list[torch.Tensor]]] = {}
        for s, loss in losses.items():
            rows = []
            for idx in parts:
                gs = torch.autograd.grad(loss[idx].mean(), params, retain_graph=True, allow_unused=True)
                rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)])
            samples[s] = rows
        per_tensor, i = [], 0
        for group, srcs in multi:
            for _ in group:
                per_tensor.append(
                    {s: GradientStats.from_samples(torch.stack([r[i] for r in samples[s]])) for s in srcs}
                )
                i += 1
        cals = calibrate_tensors(per_tensor, self.config)
        diag: dict[str, float] = {}
        wsum: dict[str, float] = {}
        wcnt: dict[str, int] = {}
        usum, ucnt = 0.0, 0
        for p, cal in zip(params, cals):
            p.grad = cal.gradient.detach().clone()
            for k, s in enumerate(cal.sources):
                wsum[s] = wsum.get(s, 0.0) + float(cal.weights[k].sum())
                wcnt[s] = wcnt.get(s, 0) + cal.weights[k].numel()
            usum += float(cal.uncertainty.sum())
            ucnt += cal.uncertainty.numel()
        for s in wsum:
            diag[f"weight/{s}"] = wsum[s] / wcnt[s]
        if ucnt:
            diag["uncertainty"] = usum / ucnt
        return diag
