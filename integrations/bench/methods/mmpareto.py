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

More than two sources on one group of parameters (the fusion transformer's
trunk: the fusion and every unimodal loss; ``zeroshot``: ``align`` as one more
task), a generalisation the paper does not cover: ``a`` is uniform ``1/S`` when
every pair of gradients has a positive cosine, else the min-norm point of all
``S`` (:func:`.mgda.min_norm`); ``h = S sum_k a_k g_k`` and
``r = ||sum_k g_k|| / ||h||`` per tensor. For ``S = 2`` it is the rule above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import EncoderRuleMethod, flat
from .mgda import min_norm, min_norm_2


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


def mmpareto_many(grads: list[list[torch.Tensor]], gamma: float = 1.5) -> tuple[list[torch.Tensor], list[float]]:
    """The rule for ``S >= 2`` sources (module docstring); ``grads[k]``: source ``k``'s tensors."""
    S = len(grads)
    G = torch.stack([flat(g) for g in grads]).to(torch.float64)
    gram = G @ G.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    off = ~torch.eye(S, dtype=torch.bool)
    a = torch.full((S,), 1.0 / S, dtype=torch.float64) if bool((cos[off] > 0).all()) else min_norm(gram)
    out = []
    for ts in zip(*grads):
        h = S * sum(float(ak) * t for ak, t in zip(a, ts))
        hn = torch.linalg.vector_norm(h)
        r = torch.linalg.vector_norm(sum(ts)) / hn if hn > 0 else torch.tensor(1.0)
        out.append(gamma * (r * h if r > 1 else h))
    return out, [float(x) for x in a]


class MMPareto(EncoderRuleMethod):
    name = "mmpareto"

    def __init__(self, gamma: float = 1.5):
        self.gamma = gamma

    def combine(self, grads, sources, diag):
        if len(grads) > 2:
            new, w = mmpareto_many(grads, self.gamma)
            for src, x in zip(sources, w):
                diag[f"a[{'+'.join(sources)}]/{src}"] = x
            return new
        new, a = mmpareto(grads[0], grads[1], self.gamma)
        diag[f"a_fusion/{sources[1]}"] = a
        return new
