"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement.

Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient
Modulation", CVPR 2022, as in the authors' code. With the fusion head's
weight split per modality, ``W = [W_1 .. W_M]``, and bias ``b``, modality
``m``'s share of the fused logits is ``o_m = h_m W_m^T + b / M``. Per batch::

    s_m   = sum_i softmax(o_m,i)[y_i]                 (confidence in the true class)
    rho_m = s_m / mean_{j != m} s_j                   (s_a / s_v for two modalities)
    k_m   = 1 - tanh(alpha * rho_m)  if rho_m > 1  else 1

Inside the modulation window (epochs ``[start, end)``; by default the first
half of the maximum number of epochs, the official 0-50 of 100), every
encoder weight tensor (the official code touches the conv weights, 4-D; here
the MLP weights, 2-D; biases are left alone) gets::

    g <- k_m * g_fusion + N(0, std(g_fusion)^2) + g_unimodal

``std(g_fusion)`` is the standard deviation of the *undamped* gradient
tensor, and the noise goes to every encoder, the dominant one and the
others. Outside the window the update is the plain sum.

``ogm_ge_dominant_noise`` (ablation, the earlier variant): confidences from
the unimodal heads, noise only on the damped (dominant) encoder with the
std of the damped gradient, biases included, no window.
"""

from __future__ import annotations

import math

import torch

from .base import EncoderRuleMethod


def _coefficients(scores: torch.Tensor, alpha: float) -> list[float]:
    """``k_m`` from the per-modality confidences ``s`` ``(M,)``."""
    M = scores.numel()
    others = (scores.sum() - scores) / max(M - 1, 1)
    rho = scores / others.clamp_min(1e-12)
    return [1.0 - math.tanh(alpha * r) if r > 1 else 1.0 for r in rho.tolist()]


class OGMGE(EncoderRuleMethod):
    """``ogm_ge``: the official modulation, noise and window."""

    name = "ogm_ge"

    def __init__(self, alpha: float = 0.1, window: tuple[float, float] = (0.0, 0.5)):
        self.alpha = alpha
        #: modulation window as fractions of the maximum number of epochs
        self.window = window
        self.active = True

    def setup(self, model):
        super().setup(model)
        self.gen = torch.Generator().manual_seed(1)
        self.active = True

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        lo, hi = self.window
        self.active = lo * max_epochs <= epoch < hi * max_epochs

    def context(self, losses, logits, y):
        with torch.no_grad():
            feats = self.model.last_features
            W, b = self.model.fusion_head.weight, self.model.fusion_head.bias
            M = len(feats)
            scores, start = [], 0
            for h in feats:
                o = h @ W[:, start : start + h.shape[1]].T + b / M
                start += h.shape[1]
                scores.append(torch.softmax(o, dim=1).gather(1, y[:, None]).sum())
            self.coef = dict(zip(self.model.modalities, _coefficients(torch.stack(scores), self.alpha)))

    def combine(self, grads, sources, diag):
        k = self.coef[sources[1]] if self.active else 1.0
        diag[f"coef/{sources[1]}"] = k
        out = []
        for gf, gu in zip(grads[0], grads[1]):
            if self.active and gf.ndim >= 2:
                noise = torch.randn(gf.shape, generator=self.gen) * (gf.std() + 1e-8)
                out.append(k * gf + noise + gu)
            else:
                out.append(gf + gu)
        return out

    def describe(self):
        return {"name": self.name, "alpha": self.alpha, "window": list(self.window), "lr": self.lr}


class OGMGEDominantNoise(EncoderRuleMethod):
    """``ogm_ge_dominant_noise`` (ablation): the earlier variant, see the module docstring."""

    name = "ogm_ge_dominant_noise"

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha

    def setup(self, model):
        super().setup(model)
        self.gen = torch.Generator().manual_seed(1)

    def context(self, losses, logits, y):
        with torch.no_grad():
            s = torch.stack([torch.softmax(z, dim=1).gather(1, y[:, None]).sum() for z in logits[1]])
            self.coef = dict(zip(self.model.modalities, _coefficients(s, self.alpha)))

    def combine(self, grads, sources, diag):
        k = self.coef[sources[1]]
        diag[f"coef/{sources[1]}"] = k
        out = []
        for gf, gu in zip(grads[0], grads[1]):
            g = k * gf
            if k < 1 and g.numel() > 1:
                g = g + torch.randn(g.shape, generator=self.gen) * g.std()
            out.append(g + gu)
        return out

    def describe(self):
        return {"name": self.name, "alpha": self.alpha, "lr": self.lr}
