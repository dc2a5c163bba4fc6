"""PCGrad: gradient surgery by projecting conflicting gradients.

Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.
Applied to each encoder's (flattened) per-source gradients ``g_1..g_S``. For
each ``i``, start from ``g_i^PC = g_i``; for every other source ``j`` (in a
random order) with ``g_i^PC . g_j < 0``::

    g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 * g_j

(the projection uses the *original* ``g_j``). The update is ``sum_i g_i^PC``.
For non-conflicting gradients it equals the plain sum.
"""

from __future__ import annotations

import torch

from .base import EncoderRuleMethod, flat, unflat


def pcgrad(grads: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """``grads``: list of S flat vectors ``(D,)``; returns ``sum_i g_i^PC`` ``(D,)``."""
    S = len(grads)
    out = torch.zeros_like(grads[0])
    for i in range(S):
        gi = grads[i].clone()
        others = [j for j in range(S) if j != i]
        order = torch.randperm(len(others), generator=generator).tolist() if generator is not None else range(len(others))
        for o in order:
            gj = grads[others[o]]
            dot = torch.dot(gi, gj)
            nn2 = torch.dot(gj, gj)
            if dot < 0 and nn2 > 0:
                gi = gi - dot / nn2 * gj
        out = out + gi
    return out


class PCGrad(EncoderRuleMethod):
    name = "pcgrad"

    def setup(self, model):
        super().setup(model)
        self.gen = torch.Generator().manual_seed(0)

    def combine(self, grads, sources, diag):
        v = pcgrad([flat(g) for g in grads], self.gen)
        return unflat(v, grads[0])
