"""The benchmark model: one MLP encoder per modality, a fusion head, one head per modality.

Forward pass for modalities ``m = 1..M`` with inputs ``x_m`` of shape ``(B, d_m)``::

    h_m = relu(W2_m relu(W1_m x_m))             # (B, feat)
    z   = fusion_head(concat_m h_m)             # (B, C)   -> loss source "fusion"
    z_m = head_m(h_m)                           # (B, C)   -> loss source m

Each encoder therefore receives gradients from two sources, ``"fusion"`` and
its own modality; each head from one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from bogc_core.errors import ConfigError

#: a bench model's inputs, one ``(B, d_m)`` tensor per modality (and ``fill``: one per modality)
Inputs = Sequence[torch.Tensor]
#: a bench model's output: the fusion logits ``(B, C)`` and the unimodal logits ``(B, C)`` each
Logits = tuple[torch.Tensor, list[torch.Tensor]]

FUSION = "fusion"
#: the contrastive loss source of the ``zeroshot`` setting (:mod:`.zeroshot`)
ALIGN = "align"


class MultiModalNet(nn.Module):
    """Late-fusion classifier; ``dims`` maps modality name -> input width, in order."""

    def __init__(self, dims: dict[str, int], n_classes: int, hidden: int = 64, feat: int = 32):
        super().__init__()
        self.last_features: list[torch.Tensor] = []
        if FUSION in dims:
            raise ConfigError(f"dims: a modality may not be named {FUSION!r} (reserved for the "
                              f"fusion loss); rename the x_{FUSION} array")
        self.modalities = tuple(dims)
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, feat), nn.ReLU())
            for d in dims.values()
        )
        self.fusion_head = nn.Linear(feat * len(dims), n_classes)
        self.heads = nn.ModuleList(nn.Linear(feat, n_classes) for _ in dims)

    @property
    def sources(self) -> tuple[str, ...]:
        return (FUSION,) + self.modalities

    def forward(self, xs: Inputs, drop: Iterable[int] = (), fill: Inputs | None = None) -> Logits:
        """``xs[i]``: ``(B, d_i)``. ``drop``: modality indices whose branch is removed;
        their features enter the fusion head as ``fill[i]`` (a ``(feat,)`` vector,
        e.g. the training mean) or, without ``fill``, as zeros. Returns fusion
        logits ``(B, C)`` and the list of unimodal logits ``(B, C)``; the encoder
        features ``h_m`` ``(B, feat)`` are kept in :attr:`last_features`."""
        drop = set(drop)
        feats = [enc(x) for enc, x in zip(self.encoders, xs)]
        self.last_features = feats
        fused_in = [
            (torch.zeros_like(h) if fill is None else fill[i].expand_as(h)) if i in drop else h
            for i, h in enumerate(feats)
        ]
        z = self.fusion_head(torch.cat(fused_in, dim=1))
        return z, [head(h) for head, h in zip(self.heads, feats)]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The shared parameters: every encoder's (reached by the fusion loss and one unimodal loss)."""
        return [p for enc in self.encoders for p in enc.parameters()]

    def laplace_layers(self) -> dict[str, nn.Module]:
        """Last layer of each source (for ``samples="laplace"``): fusion head, unimodal heads."""
        return {FUSION: self.fusion_head, **dict(zip(self.modalities, self.heads))}

    def param_groups(self) -> list[tuple[list[nn.Parameter], tuple[str, ...]]]:
        """Parameters grouped by the set of loss sources that reach them."""
        groups: list[tuple[list[nn.Parameter], tuple[str, ...]]] = [
            (list(enc.parameters()), (FUSION, m)) for enc, m in zip(self.encoders, self.modalities)]
        groups.append((list(self.fusion_head.parameters()), (FUSION,)))
        groups += [(list(h.parameters()), (m,)) for h, m in zip(self.heads, self.modalities)]
        return groups

