"""Plain summed losses and uniform averaging (the baselines every method is compared to).

``sum``: ``g = grad sum_k L_k`` with ``L_k`` the mean loss of source ``k``
(fusion and every unimodal loss, weight 1 each): the standard multi-task
objective of multimodal training with unimodal auxiliary heads.
``uniform``: ``g = grad (1/S) sum_k L_k``, the same direction with the
learning rate effectively divided by the number of sources ``S``.
"""

from __future__ import annotations

from .base import Method


class Sum(Method):
    """``sum``: one backward of ``sum_k mean(loss_k)``."""

    name = "sum"
    factor_mean = False

    def backward(self, losses, logits, y):
        total = sum(loss.mean() for loss in losses.values())
        if self.factor_mean:
            total = total / len(losses)
        for p in self.model.parameters():
            p.grad = None
        total.backward()
        return {}


class Uniform(Sum):
    """``uniform``: one backward of ``(1/S) sum_k mean(loss_k)``."""

    name = "uniform"
    factor_mean = True
