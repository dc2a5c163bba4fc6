"""Joint training: the fusion loss alone trains the encoders.

The baseline that OGM-GE (Peng et al., CVPR 2022), MMPareto (Wei and Hu,
ICML 2024) and the BOGC paper measure against: a late-fusion network trained
on the multimodal loss only. With ``h_m`` the features of encoder ``m``::

    encoders, fusion head:  g = grad mean(L_fusion)
    head m:                 g = grad_{theta_m} mean(CE(head_m(stopgrad(h_m)), y))

The unimodal heads are trained, on detached features, so that the unimodal
accuracies (the imbalance lens) and the ``surviving_heads`` missing-modality
rule still have trained heads to read; they never move the encoders (the
linear probe of the joint encoders, kept up to date during training).
"""

from __future__ import annotations

from .base import Method, fusion_only_grads


class FusionOnly(Method):
    """``fusion_only``: see the module docstring."""

    name = "fusion_only"

    def backward(self, losses, logits, y):
        fusion_only_grads(self.model, losses)
        return {}
