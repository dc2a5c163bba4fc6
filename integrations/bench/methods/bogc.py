"""BOGC (``docs/method.md``) and its variants as training methods, plus inverse-variance weighting.

``bogc``: ``CalibrationConfig()`` defaults (``gamma=0.5``, ``evidence_from="snr"``,
``weights="evidence"``, ``scale="belief"``), micro-batch samples, 4 chunks::

    g_hat_d = s_d * S * sum_k w_kd * mu_kd

(Bayesian posterior of each source's gradient -> evidence -> reduced
Dempster-Shafer fusion -> weights ``w`` and belief scale ``s``). Paper: "Multi-Modal
Learning with Bayesian-Oriented Gradient Calibration", arXiv 2505.23071.

``bogc_normmatched``: the same direction, rescaled per parameter tensor to the
norm of the plain sum's gradient, ``g <- g_hat * ||g_sum|| / ||g_hat||``. It
separates BOGC's direction from its step size (the belief scale acts like a
larger learning rate).

``inverse_variance``: ``docs/method.md`` closed form 6, exactly: ``evidence_from="precision"``,
``gamma=1``, ``weights="evidence"``, ``scale="none"`` and the prior
``alpha0=0, beta0=0`` (no empirical-Bayes shrinkage), so ``tau = n^2 / M2`` is the
precision of the mean gradient and ``g_hat = S * sum_k tau_k m_k / sum_k tau_k``,
the product-of-Gaussians (inverse-variance) combination, per dimension. The
evidence clip is widened to ``log(1e12)`` so that it does not bind in practice.

A gamma schedule (``gamma_schedule=(g_first, g_last)``) moves ``gamma``
linearly from ``g_first`` at the first epoch to ``g_last`` at the last
allowed one (a variant of the pre-registered search).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from bogc_core import CalibrationConfig, NormalGammaPrior

from .base import Method

INVERSE_VARIANCE = CalibrationConfig(
    evidence_from="precision", gamma=1.0, weights="evidence", scale="none",
    prior=NormalGammaPrior(alpha0=0.0, beta0=0.0), clip=math.log(1e12),
)


class BOGC(Method):
    """BOGC through ``bogc_core.integrations.torch.GradientCalibrator``."""

    name = "bogc"
    cost = 8.0

    def __init__(self, name: str = "bogc", config: CalibrationConfig | None = None,
                 samples: str = "microbatch", chunks: int = 4, rho: float | None = None,
                 grid: dict[str, list[Any]] | None = None, norm_match: bool = False,
                 gamma_schedule: tuple[float, float] | None = None):
        self.name = name
        self.config = config or CalibrationConfig()
        self.samples = samples
        self.chunks = chunks
        self.rho = rho
        self.grid = grid or {}
        self.norm_match = norm_match
        self.gamma_schedule = gamma_schedule

    def with_params(self, **kw) -> BOGC:
        """Copy with ``lr`` and/or ``CalibrationConfig`` fields (e.g. ``gamma``) replaced."""
        lr = kw.pop("lr", self.lr)
        new = BOGC(self.name, replace(self.config, **kw), self.samples, self.chunks, self.rho,
                   self.grid, self.norm_match, self.gamma_schedule)
        new.lr = lr
        return new

    def setup(self, model):
        super().setup(model)
        from bogc_core.integrations.torch import Diagnostics, GradientCalibrator

        # one sampled diagnostics step per epoch, its first, so every epoch has a point
        kw: dict[str, Any] = {
            "config": self.config, "samples": self.sample_source(model),
            "diagnostics": Diagnostics(every=max(int(self.steps_per_epoch), 1)),
        }
        if self.samples in ("per_example", "microbatch") and getattr(model, "rows_independent", True):
            # the per-layer shortcut for nn.Linear (no per-example grads); not with a loss that
            # couples the rows of a batch (zeroshot's align), which breaks its row assumption
            kw["model"] = model
        self.cal = GradientCalibrator(list(model.named_parameters()), **kw)

    def sample_source(self, model) -> Any:
        """The calibrator's sample source for ``model``, new for each run (Laplace hooks its
        heads): ``samples`` with ``chunks`` (micro-batches) and ``rho`` (``None``: the
        sample source's default)."""
        from bogc_core.integrations.torch import Laplace, Microbatch, PerExample, Steps

        rho = self.rho
        if self.samples == "microbatch":
            return Microbatch(self.chunks, rho=rho)
        if self.samples == "per_example":
            return PerExample(rho=rho)
        if self.samples == "steps":
            return Steps() if rho is None else Steps(rho)
        if self.samples == "laplace":
            return Laplace(layers=model.laplace_layers(), rho=rho)
        return self.samples  # anything else: the calibrator names the remedy

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        if self.gamma_schedule is not None:
            first, last = self.gamma_schedule
            t = epoch / max(max_epochs - 1, 1)
            self.cal.config = replace(self.config, gamma=first + t * (last - first))

    def backward(self, losses, logits, y):
        if self.samples == "steps":
            losses = {k: v.mean() for k, v in losses.items()}
        plain = None
        if self.norm_match:
            params = list(self.model.parameters())
            total = sum(v.mean() for v in losses.values())
            plain = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        diag = self.cal.backward(losses)
        if plain is not None:
            with torch.no_grad():
                for p, g in zip(params, plain):
                    if p.grad is None or g is None:
                        continue
                    n_hat = torch.linalg.vector_norm(p.grad)
                    if n_hat > 0:
                        p.grad.mul_(torch.linalg.vector_norm(g) / n_hat)
        return summarize_diagnostics(diag, self.model)

    def describe(self):
        c = self.config
        return {"name": self.name, "gamma": c.gamma, "evidence_from": c.evidence_from,
                "weights": c.weights, "scale": c.scale, "scope": c.scope, "s_max": c.s_max,
                "samples": self.samples, "chunks": self.chunks, "rho": self.rho, "lr": self.lr,
                "norm_match": self.norm_match,
                "gamma_schedule": list(self.gamma_schedule) if self.gamma_schedule else None}


def summarize_diagnostics(diag: Any, model) -> dict[str, float]:
    """Reduce a calibrator's diagnostics to ``weight/<source>`` and ``uncertainty`` floats.

    ``weight/<s>``: mean weight of source ``s`` over the calibrated dimensions
    it reaches (numel-weighted over tensors); ``uncertainty``: mean fused
    uncertainty over all calibrated dimensions.
    """
    if not isinstance(diag, dict) or "parameters" not in diag:
        return {}
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    wsum: dict[str, float] = {}
    wcnt: dict[str, int] = {}
    for pname, pd in diag["parameters"].items():
        wm = pd.get("weight_mean") if isinstance(pd, dict) else None
        if not wm:
            continue
        for s, w in wm.items():
            wsum[s] = wsum.get(s, 0.0) + float(w) * sizes[pname]
            wcnt[s] = wcnt.get(s, 0) + sizes[pname]
    out = {f"weight/{s}": wsum[s] / wcnt[s] for s in wsum}
    if "fused_uncertainty_mean" in diag:
        out["uncertainty"] = float(diag["fused_uncertainty_mean"])
    return out
