"""PCGrad: gradient surgery by projecting conflicting gradients.

Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
Algorithm 1, over *all* shared parameters. With ``g_k`` the gradient of loss
``k`` (fusion and every unimodal loss) with respect to every encoder's
parameters (zero where loss ``k`` does not reach), flattened to one vector of
length ``D`` (the rows of the ``(S, D)`` Jacobian ``J``): for each ``i``, start
from ``g_i^PC = g_i``; for every other loss ``j``, in a random order, with
``g_i^PC . g_j < 0``::

    g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 * g_j

(the projection uses the *original* ``g_j``). The shared update is
``sum_i g_i^PC``; for non-conflicting gradients it is the plain sum. Each
``g_i^PC`` stays in the span of the rows, so the update is ``w @ J`` with weights
``w`` ``(S,)`` computed from the Gram matrix ``J J^T`` alone. The random order is
TorchJD's (``torchjd.aggregation.PCGrad``): for loss ``i``, a fresh permutation of
all ``S`` losses, ``i`` itself skipped; drawn from the method's own generator,
so the update equals TorchJD's on the same Jacobian when its global generator
is seeded alike. Task-specific parameters (the heads) get their own loss's
gradient, as in the paper (PCGrad acts on the shared parameters).

``pcgrad_per_encoder`` (ablation, the earlier variant): the same surgery applied
separately to each encoder's two gradients (fusion and its modality), which
is not the paper's rule when gradients conflict in one encoder and agree in
another.
"""

from __future__ import annotations

import torch

from .base import EncoderRuleMethod, JointRuleMethod, flat, unflat


def pcgrad_weights(gram: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Weights ``w`` ``(S,)`` with ``sum_i g_i^PC = w @ J``, from ``gram = J J^T`` ``(S, S)``.

    Without ``generator`` the other losses are visited in index order. Computed in float64.
    """
    G = gram.detach().to(torch.float64)
    S = G.shape[0]
    total = torch.zeros(S, dtype=torch.float64)
    for i in range(S):
        order = torch.randperm(S, generator=generator).tolist() if generator is not None else range(S)
        w = torch.zeros(S, dtype=torch.float64)
        w[i] = 1.0
        for j in order:
            if j == i:
                continue
            dot = float(G[j] @ w)  # g_i^PC . g_j
            if dot < 0.0 and G[j, j] > 0.0:
                w[j] -= dot / G[j, j]
        total += w
    return total


def pcgrad(grads: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """``grads``: list of S flat vectors ``(D,)``; returns ``sum_i g_i^PC`` ``(D,)``."""
    J = torch.stack(grads)
    return (pcgrad_weights(J @ J.T, generator).to(J.dtype)) @ J


class PCGrad(JointRuleMethod):
    """``pcgrad``: Algorithm 1 on the Jacobian of all shared parameters and all losses."""

    name = "pcgrad"
    diag_key = "pcgrad_w"

    def setup(self, model):
        super().setup(model)
        self.gen = torch.Generator().manual_seed(0)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return pcgrad_weights(gram, self.gen)


class PCGradPerEncoder(EncoderRuleMethod):
    """``pcgrad_per_encoder`` (ablation): the surgery per encoder, on its two gradients."""

    name = "pcgrad_per_encoder"

    def setup(self, model):
        super().setup(model)
        self.gen = torch.Generator().manual_seed(0)

    def combine(self, grads, sources, diag):
        v = pcgrad([flat(g) for g in grads], self.gen)
        return unflat(v, grads[0])
