"""MGDA with the two-objective min-norm solution.

Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018 (after Désidéri's MGDA, 2012). For an encoder's two source
gradients ``g_1`` (fusion) and ``g_2`` (unimodal), the minimum-norm point of
their convex hull is ``d = a g_1 + (1 - a) g_2`` with::

    a = clip( (g_2 - g_1) . g_2 / ||g_1 - g_2||^2 , 0, 1 )

(``a = 1/2`` when ``g_1 = g_2``). The update is ``2 d``: the factor 2 (the
number of objectives) keeps it on the scale of the summed loss, so that
with ``g_1 = g_2`` it equals the plain sum.
"""

from __future__ import annotations

import torch

from .base import EncoderRuleMethod, flat, unflat


def min_norm_2(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """Weight ``a`` of ``g1`` in the min-norm element of ``conv{g1, g2}`` (flat vectors)."""
    diff = g1 - g2
    den = torch.dot(diff, diff)
    if den <= 0:
        return 0.5
    return float(torch.clamp(torch.dot(g2 - g1, g2) / den, 0.0, 1.0))


class MGDA(EncoderRuleMethod):
    name = "mgda"

    def combine(self, grads, sources, diag):
        if len(grads) != 2:
            raise ValueError("MGDA here is the two-objective solver; each encoder has two sources")
        g1, g2 = flat(grads[0]), flat(grads[1])
        a = min_norm_2(g1, g2)
        return unflat(2.0 * (a * g1 + (1 - a) * g2), grads[0])
