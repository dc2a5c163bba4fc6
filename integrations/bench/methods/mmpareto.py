"""MMPareto: Pareto integration of multimodal and unimodal gradients.

Wei and Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
Assistance", ICML 2024. Per encoder, with ``g_m`` the gradient of the
multimodal (fusion) loss and ``g_u`` that of its unimodal loss (both
flattened over the encoder's tensors):

- if ``cos(g_m, g_u) > 0`` the weights are ``a_m = a_u = 1/2``; otherwise
  ``(a_m, a_u)`` is the two-objective min-norm solution (see :mod:`.mgda`);
- per parameter tensor, ``h = 2 (a_m g_m + a_u g_u)``; with
  ``r = ||g_m + g_u|| / ||h||`` (norms over that tensor) the update is
  ``gamma * r * h`` if ``r > 1`` else ``gamma * h``, with ``gamma = 1.5``:
  the direction is common to both objectives and the magnitude at least that
  of the plain sum, enlarged by ``gamma`` (the paper's generalisation argument).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import EncoderRuleMethod, flat
from .mgda import min_norm_2


def mmpareto(g_m: list[torch.Tensor], g_u: list[torch.Tensor], gamma: float = 1.5) -> tuple[list[torch.Tensor], float]:
    """Per-tensor MMPareto update of one encoder; returns (tensors, a_m)."""
    fm, fu = flat(g_m), flat(g_u)
    if F.cosine_similarity(fm, fu, dim=0) > 0:
        a = 0.5
    else:
        a = min_norm_2(fm, fu)
    out = []
    for tm, tu in zip(g_m, g_u):
        h = 2.0 * (a * tm + (1 - a) * tu)
        hn = torch.linalg.vector_norm(h)
        r = torch.linalg.vector_norm(tm + tu) / hn if hn > 0 else torch.tensor(1.0)
        out.append(gamma * (r * h if r > 1 else h))
    return out, a


class MMPareto(EncoderRuleMethod):
    name = "mmpareto"

    def __init__(self, gamma: float = 1.5):
        self.gamma = gamma

    def combine(self, grads, sources, diag):
        new, a = mmpareto(grads[0], grads[1], self.gamma)
        diag[f"a_fusion/{sources[1]}"] = a
        return new
