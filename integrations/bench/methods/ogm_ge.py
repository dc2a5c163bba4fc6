"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement.

Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient
Modulation", CVPR 2022, as in the authors' code (``main.py``, the concat
fusion). Only the fusion loss is backpropagated into the encoders; the
unimodal confidences are read off the fusion head. With the fusion head's
weight split per modality, ``W = [W_1 .. W_M]``, and bias ``b``, modality
``m``'s share of the fused logits is ``o_m = h_m W_m^T + b / M``. Per batch::

    s_m   = sum_i softmax(o_m,i)[y_i]                 (confidence in the true class)
    rho_m = s_m / mean_{j != m} s_j                   (s_a / s_v for two modalities)
    k_m   = 1 - tanh(alpha * rho_m)  if rho_m > 1  else 1

``alpha = 0.1``, the default modulation setting of the official README (which
recommends 0.1 for VGGSound and 0.8 for CREMA-D). Inside the modulation window,
epochs ``start <= epoch <= end`` (0-based, end included, as the official test;
by default ``[0, 0.5 max_epochs]``, the official 0-50 of 100), every encoder
weight tensor (the official code touches the conv weights, 4-D; here the MLP
weights, 2-D; biases are left alone) gets::

    g <- k_m * g_fusion + N(0, (std(g_fusion) + 1e-8)^2)

``std(g_fusion)`` is the standard deviation of the *undamped* gradient tensor,
and the noise goes to every encoder, the dominant one and the others. Outside
the window the update is the fusion gradient alone (``fusion_only``). The
official network has no unimodal heads; the harness's heads are trained on
detached features as in ``fusion_only`` (they never reach the encoders), so that
the unimodal accuracies and the ``surviving_heads`` rule can be read.

``ogm_ge_unimodal`` (ablation, the earlier variant): the same modulation and
window, plus the undamped unimodal gradients in the encoders::

    g <- k_m * g_fusion + N(0, (std(g_fusion) + 1e-8)^2) + g_unimodal

and the plain sum outside the window.

``ogm_ge_dominant_noise`` (ablation, the earliest variant): confidences from
the unimodal heads, noise only on the damped (dominant) encoder with the
std of the damped gradient, biases included, no window, unimodal gradients added.
"""

from __future__ import annotations

import math

import torch

from .base import EncoderRuleMethod, Method, fusion_only_grads

#: the official default modulation setting (README): alpha 0.1, epochs 0 to 50 of 100
ALPHA = 0.1
WINDOW = (0.0, 0.5)


def coefficients(scores: torch.Tensor, alpha: float) -> list[float]:
    """``k_m`` from the per-modality confidences ``s`` ``(M,)``."""
    M = scores.numel()
    others = (scores.sum() - scores) / max(M - 1, 1)
    rho = scores / others.clamp_min(1e-12)
    return [1.0 - math.tanh(alpha * r) if r > 1 else 1.0 for r in rho.tolist()]


def in_window(epoch: int, max_epochs: int, window: tuple[float, float]) -> bool:
    """``start <= epoch <= end`` with ``(start, end) = window * max_epochs`` (end included)."""
    lo, hi = window
    return lo * max_epochs <= epoch <= hi * max_epochs


@torch.no_grad()
def fusion_share_confidences(model, y: torch.Tensor) -> torch.Tensor:
    """``s_m`` ``(M,)`` from the last forward's features and the fusion head's shares.

    A model without a concatenating fusion head (the fusion transformer) gives its own
    ``modality_confidences(y)`` (the fusion head's confidence with one modality attended).
    """
    if hasattr(model, "modality_confidences"):
        return model.modality_confidences(y)
    feats = model.last_features
    W, b = model.fusion_head.weight, model.fusion_head.bias
    M = len(feats)
    scores, start = [], 0
    for h in feats:
        o = h @ W[:, start : start + h.shape[1]].T + b / M
        start += h.shape[1]
        scores.append(torch.softmax(o, dim=1).gather(1, y[:, None]).sum())
    return torch.stack(scores)


def modulate(g: torch.Tensor, k: float, gen: torch.Generator) -> torch.Tensor:
    """OGM-GE on one encoder tensor's fusion gradient: weights damped plus noise, biases kept."""
    if g.ndim < 2:
        return g
    return k * g + torch.randn(g.shape, generator=gen) * (g.std() + 1e-8)


class _Windowed(Method):
    """alpha, the modulation window and the noise generator of the official rule and its
    unimodal-augmented ablation."""

    def __init__(self, alpha: float = ALPHA, window: tuple[float, float] = WINDOW):
        self.alpha = alpha
        #: modulation window as fractions of the maximum number of epochs, both ends included
        self.window = window
        self.active = True

    def setup(self, model):
        super().setup(model)
        self.gen = torch.Generator().manual_seed(1)
        self.active = True

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        self.active = in_window(epoch, max_epochs, self.window)


class OGMGE(_Windowed):
    """``ogm_ge``: the official rule: fusion loss only, modulation, noise, window with its end."""

    name = "ogm_ge"

    def backward(self, losses, logits, y):
        k = coefficients(fusion_share_confidences(self.model, y), self.alpha)
        fusion_only_grads(self.model, losses)
        diag = {}
        for enc, m, km in zip(self.model.encoders, self.model.modalities, k):
            diag[f"coef/{m}"] = km if self.active else 1.0
            # the official code logs the unimodal losses and never backpropagates them
            diag[f"loss/{m}"] = float(losses[m].detach().mean())
            if self.active:
                for p in enc.parameters():
                    p.grad = modulate(p.grad, km, self.gen)
        return diag

    def describe(self):
        return {"name": self.name, "alpha": self.alpha, "window": list(self.window), "lr": self.lr}


class OGMGEUnimodal(_Windowed, EncoderRuleMethod):
    """``ogm_ge_unimodal`` (ablation): the official modulation plus the unimodal gradients."""

    name = "ogm_ge_unimodal"

    def context(self, losses, logits, y):
        k = coefficients(fusion_share_confidences(self.model, y), self.alpha)
        self.coef = dict(zip(self.model.modalities, k))

    def combine(self, grads, sources, diag):
        k = self.coef[sources[1]] if self.active else 1.0
        diag[f"coef/{sources[1]}"] = k
        if not self.active:
            return [gf + gu for gf, gu in zip(grads[0], grads[1])]
        return [modulate(gf, k, self.gen) + gu for gf, gu in zip(grads[0], grads[1])]

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
            self.coef = dict(zip(self.model.modalities, coefficients(s, self.alpha)))

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
