"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement.

Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient
Modulation", CVPR 2022. Per batch, each modality's confidence in the true
class ``s_m = sum_i softmax(z_m,i)[y_i]`` (here ``z_m`` are the unimodal
heads' logits; the paper uses the fusion layer's per-modality share). The
discrepancy ratio ``rho_m = s_m / mean_{j != m} s_j`` (for two modalities
the paper's ``s_a / s_v``) gives the coefficient::

    k_m = 1 - tanh(alpha * rho_m)   if rho_m > 1   else 1

The dominant encoder's gradient from the multimodal (fusion) loss is
multiplied by ``k_m``; its unimodal loss gradient is added unchanged. GE:
Gaussian noise ``N(0, sigma^2)`` is added to each modulated encoder tensor's
gradient, ``sigma`` the standard deviation of that gradient tensor, which
restores the noise level that the damping removed.
"""

from __future__ import annotations

import math

import torch

from .base import EncoderRuleMethod


class OGMGE(EncoderRuleMethod):
    name = "ogm_ge"

    def __init__(self, alpha: float = 0.1, noise: bool = True):
        self.alpha = alpha
        self.noise = noise

    def setup(self, model):
        super().setup(model)
        self.gen = torch.Generator().manual_seed(1)

    def context(self, losses, logits, y):
        with torch.no_grad():
            s = torch.stack([torch.softmax(z, dim=1).gather(1, y[:, None]).sum() for z in logits[1]])
            M = s.numel()
            others = (s.sum() - s) / max(M - 1, 1)
            rho = s / others.clamp_min(1e-12)
            self.coef = {
                m: 1.0 - math.tanh(self.alpha * r) if r > 1 else 1.0
                for m, r in zip(self.model.modalities, rho.tolist())
            }

    def combine(self, grads, sources, diag):
        k = self.coef[sources[1]]
        diag[f"coef/{sources[1]}"] = k
        out = []
        for gf, gu in zip(grads[0], grads[1]):
            g = k * gf
            if self.noise and k < 1 and g.numel() > 1:
                g = g + torch.randn(g.shape, generator=self.gen) * g.std()
            out.append(g + gu)
        return out

    def describe(self):
        return {"name": self.name, "alpha": self.alpha, "lr": self.lr}
