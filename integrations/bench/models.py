"""The ``--model`` choices of ``bogc bench`` and how each network is built.

``mlp`` is :class:`.model.MultiModalNet` (late fusion; with the ``zeroshot``
projections :class:`.zeroshot.AlignedNet`); ``transformer`` is
:class:`.transformer.FusionTransformer`.
"""

from __future__ import annotations

from typing import Any

from bogc_core.errors import ConfigError

from .model import MultiModalNet
from .transformer import FusionTransformer
from .zeroshot import EMBED_DIM, AlignedNet

#: ``--model`` choices
MODELS = ("mlp", "transformer")


def build_model(name: str, dims: dict[str, int], n_classes: int, hidden: int = 64, feat: int = 32,
                align: bool = False) -> Any:
    """The ``--model`` network; ``align`` adds the ``zeroshot`` projections and source."""
    if name == "mlp":
        if align:
            return AlignedNet(dims, n_classes, hidden, feat)
        return MultiModalNet(dims, n_classes, hidden, feat)
    if name == "transformer":
        return FusionTransformer(dims, n_classes, EMBED_DIM if align else None)
    raise ConfigError(f"model: must be one of {MODELS}, got {name!r}")
