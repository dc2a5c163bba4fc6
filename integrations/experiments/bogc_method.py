"""BOGC (METHOD.md) and its ablations as training methods, plus inverse-variance weighting.

``bogc``: ``CalibrationConfig()`` defaults (``gamma=0.5``, ``evidence_from="snr"``,
``weights="evidence"``, ``scale="belief"``), micro-batch samples, 4 chunks::

    g_hat_d = s_d * S * sum_k w_kd * mu_kd

(Bayesian posterior of each source's gradient -> evidence -> reduced
Dempster-Shafer fusion -> weights ``w`` and belief scale ``s``). Paper: "Multi-Modal
Learning with Bayesian-Oriented Gradient Calibration", arXiv 2505.23071.

``inverse_variance``: METHOD.md closed form 6, exactly: ``evidence_from="precision"``,
``gamma=1``, ``weights="evidence"``, ``scale="none"`` and the prior
``alpha0=0, beta0=0`` (no empirical-Bayes shrinkage), so ``tau = n^2 / M2`` is the
precision of the mean gradient and ``g_hat = S * sum_k tau_k m_k / sum_k tau_k``,
the product-of-Gaussians (inverse-variance) combination, per dimension. The
evidence clip is widened to ``log(1e12)`` so that it does not bind in practice.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from bogc_core import CalibrationConfig, NormalGammaPrior

from .base import Method
from .bogc_adapter import MicrobatchCalibrator


def real_calibrator():
    """The PyTorch integration's ``GradientCalibrator`` class, or None if it is not there yet."""
    try:
        from bogc_core.integrations.torch import GradientCalibrator
    except ImportError:
        return None
    return GradientCalibrator


INVERSE_VARIANCE = CalibrationConfig(
    evidence_from="precision", gamma=1.0, weights="evidence", scale="none",
    prior=NormalGammaPrior(alpha0=0.0, beta0=0.0), clip=math.log(1e12),
)


class BOGC(Method):
    """BOGC through ``GradientCalibrator`` (fallback: :class:`.bogc_adapter.MicrobatchCalibrator`)."""

    name = "bogc"

    def __init__(self, name: str = "bogc", config: CalibrationConfig | None = None,
                 samples: str = "microbatch", chunks: int = 4, rho: float | None = None,
                 grid: dict[str, list[Any]] | None = None):
        self.name = name
        self.config = config or CalibrationConfig()
        self.samples = samples
        self.chunks = chunks
        self.rho = rho
        self.grid = grid or {}

    def with_params(self, **kw) -> BOGC:
        """Copy with ``lr`` and/or ``CalibrationConfig`` fields (e.g. ``gamma``) replaced."""
        lr = kw.pop("lr", self.lr)
        new = BOGC(self.name, replace(self.config, **kw), self.samples, self.chunks, self.rho, self.grid)
        new.lr = lr
        return new

    def setup(self, model):
        super().setup(model)
        GC = real_calibrator()
        self.backend = "GradientCalibrator" if GC is not None else "fallback-adapter"
        if GC is not None:
            kw: dict[str, Any] = {"config": self.config, "samples": self.samples, "chunks": self.chunks}
            if self.rho is not None:
                kw["rho"] = self.rho
            if self.samples in ("per_example", "microbatch"):
                kw["model"] = model  # the per-layer shortcut for nn.Linear (no per-example grads)
            if self.samples == "laplace":
                kw["laplace_layers"] = model.laplace_layers()
            self.cal = GC(list(model.named_parameters()), **kw)
        else:
            if self.samples != "microbatch":
                raise RuntimeError(f"{self.name}: samples={self.samples!r} needs GradientCalibrator")
            self.cal = MicrobatchCalibrator(model.param_groups(), self.config, self.chunks)

    def backward(self, losses, logits, y):
        if self.samples == "steps":
            losses = {k: v.mean() for k, v in losses.items()}
        diag = self.cal.backward(losses)
        return summarize_diagnostics(diag, self.model)

    def describe(self):
        c = self.config
        return {"name": self.name, "gamma": c.gamma, "evidence_from": c.evidence_from,
                "weights": c.weights, "scale": c.scale, "scope": c.scope, "samples": self.samples,
                "chunks": self.chunks, "rho": self.rho, "lr": self.lr,
                "implementation": getattr(self, "backend", None)}


def summarize_diagnostics(diag: Any, model) -> dict[str, float]:
    """Reduce a calibrator's diagnostics to ``weight/<source>`` and ``uncertainty`` floats.

    ``weight/<s>``: mean weight of source ``s`` over the calibrated dimensions
    it reaches (numel-weighted over tensors); ``uncertainty``: mean fused
    uncertainty over all calibrated dimensions.
    """
    if not isinstance(diag, dict):
        return {}
    if "parameters" not in diag:  # the fallback adapter reports these directly
        return {k: float(v) for k, v in diag.items()
                if (k.startswith("weight/") or k == "uncertainty") and isinstance(v, (int, float))}
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
