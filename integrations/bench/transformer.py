"""``--model transformer``: a small fusion transformer whose every trunk parameter is shared.

Tokens. Each modality's whole feature vector ``x_m`` ``(B, d_m)`` is projected
by one ``nn.Linear(d_m, T * W)`` to ``T =`` :data:`TOKENS` tokens of width
``W =`` :data:`WIDTH` (so any ``d_m >= 1`` works), and a learned modality
embedding ``mod_m`` ``(W,)`` (row ``m`` of an ``nn.Embedding(M, W)``) is added
to each of them::

    tok_m = reshape(A_m x_m + b_m, (B, T, W)) + mod_m                 (B, T, W)
    seq   = [cls; tok_1; ...; tok_M]                                  (B, 1 + M T, W)
    out   = LayerNorm(Block(Block(seq)))
    Block(h) = h + Drop(Out(Attn(QKV(LN(h)))));  then h + Drop(FF2(relu(FF1(LN(h)))))
            pre-norm, 4 heads (scaled dot-product attention), FFN width 2W,
            dropout 0.1 on each sub-layer's output (residual dropout)
    z     = fusion_head(out[:, 0])                                    (B, C) -> "fusion"
    z_m   = head_m(mean of out over modality m's T tokens)            (B, C) -> m

Every output token attends to every token, so the tokenizers, the modality
embeddings, the CLS token and every attention, feed-forward and LayerNorm
parameter are reached by every source: the fusion loss and all unimodal
losses (and ``align`` in the ``zeroshot`` setting). :meth:`FusionTransformer.param_groups` says so.

In the ``zeroshot`` setting each modality's embedding comes from a forward of
the same blocks over ``[cls; tok_m]`` alone (the other modalities masked out)::

    e_m = normalize(P_m(mean over tokens of Blocks([cls; tok_m])[:, 1:]))  (B, D)

so a query never sees the row's other modality; the fusion and unimodal heads
read the joint forward above.

Missing modalities (``drop``): without ``fill`` the dropped modalities' tokens
are masked out of attention as keys (no other token attends to them, so the
CLS output and the kept modalities' outputs do not depend on them); with
``fill`` (``mean_impute``) their tokens are replaced by ``fill[i]`` ``(T, W)``,
the mean tokens over the training rows, and stay in attention.
:attr:`last_features` holds the input tokens ``tok_m`` for that mean.

Every parameter sits in an ``nn.Linear``, ``nn.LayerNorm`` or ``nn.Embedding``
called once per forward (the CLS token is an ``nn.Embedding(1, W)`` looked up
per row), so ``GradientCalibrator(..., model=net)`` computes every per-example
statistic from the per-layer formulas (:mod:`bogc_core.integrations.torch.layer_grads`),
with no per-example backward pass. Attention mixes tokens within one example,
never across examples, so the formulas' row assumption holds. In ``zeroshot``
the blocks run once per modality more and ``align`` couples the rows of a batch,
so there every tensor takes the generic path (exact per-example gradients from
batched backward passes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from bogc_core.errors import ConfigError

from .model import ALIGN, FUSION, Inputs, Logits

#: tokens per modality
TOKENS = 2
#: token width
WIDTH = 32
LAYERS = 2
HEADS = 4
#: feed-forward width of each encoder layer
FFN = 2 * WIDTH
DROPOUT = 0.1


class Block(nn.Module):
    """One pre-norm encoder layer on ``(B, L, W)``; ``keep`` ``(B, 1, 1, L)`` (True: a key
    every token may attend to) or None.

    In eval mode it is PyTorch's ``TransformerEncoderLayer(norm_first=True)``. In training
    only the sub-layers' outputs are dropped, not the attention weights or the feed-forward
    hidden units: on the CPU, drawing those masks cost a fifth of a step.
    """

    def __init__(self, width: int = WIDTH, heads: int = HEADS, ffn: int = FFN,
                 dropout: float = DROPOUT):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ff1, self.ff2 = nn.Linear(width, ffn), nn.Linear(ffn, width)

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        B, L, W = h.shape
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(self.norm1(h)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        h = h + F.dropout(self.out(a.transpose(1, 2).reshape(B, L, W)), p, self.training)
        return h + F.dropout(self.ff2(F.relu(self.ff1(self.norm2(h)))), p, self.training)


class Trunk(nn.Module):
    """:data:`LAYERS` blocks and a final LayerNorm: ``(B, L, W) -> (B, L, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, keep)
        return self.norm(h)


class Tokenizer(nn.Module):
    """``x`` ``(B, d)`` -> ``(B, tokens, width)``: one Linear, reshaped."""

    def __init__(self, d: int, tokens: int = TOKENS, width: int = WIDTH):
        super().__init__()
        self.tokens, self.width = tokens, width
        self.proj = nn.Linear(d, tokens * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).view(x.shape[0], self.tokens, self.width)


def _embedding(rows: int) -> nn.Embedding:
    e = nn.Embedding(rows, WIDTH)
    nn.init.normal_(e.weight, std=0.02)
    return e


class FusionTransformer(nn.Module):
    """See the module docstring. ``dims``: modality -> input width, in order;
    ``embed_dim``: width of the ``zeroshot`` projections (None: no projections)."""

    def __init__(self, dims: dict[str, int], n_classes: int, embed_dim: int | None = None):
        super().__init__()
        reserved = (FUSION, ALIGN) if embed_dim else (FUSION,)
        for r in reserved:
            if r in dims:
                raise ConfigError(f"dims: a modality may not be named {r!r} (reserved for a loss "
                                  f"source); rename the x_{r} array")
        self.modalities = tuple(dims)
        self.encoders = nn.ModuleList(Tokenizer(d) for d in dims.values())
        self.modality = _embedding(len(dims))
        self.cls = _embedding(1)
        self.trunk = Trunk()
        self.fusion_head = nn.Linear(WIDTH, n_classes)
        self.heads = nn.ModuleList(nn.Linear(WIDTH, n_classes) for _ in dims)
        self.projections = (nn.ModuleList(nn.Linear(WIDTH, embed_dim) for _ in dims)
                            if embed_dim else None)
        #: per-example losses depend on their own row only (not with the batch-wide ``align``)
        self.rows_independent = self.projections is None
        self.last_features: list[torch.Tensor] = []
        self.last_embeddings: list[torch.Tensor] = []
        self.last_inputs: list[torch.Tensor] = []

    @property
    def sources(self) -> tuple[str, ...]:
        return (FUSION,) + self.modalities + ((ALIGN,) if self.projections else ())

    def spans(self) -> list[slice]:
        """Positions of each modality's tokens in the sequence (CLS is position 0)."""
        return [slice(1 + i * TOKENS, 1 + (i + 1) * TOKENS) for i in range(len(self.modalities))]

    def tokens(self, xs: Inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The CLS token ``(B, 1, W)`` and each modality's tokens ``tok_m`` ``(B, T, W)``."""
        B = xs[0].shape[0]
        ids = torch.arange(len(xs), device=xs[0].device).repeat_interleave(TOKENS)
        mod = self.modality(ids.expand(B, -1))  # one call per forward: (B, M T, W)
        cls = self.cls(torch.zeros(B, 1, dtype=torch.long, device=xs[0].device))
        return cls, [enc(x) + mod[:, s.start - 1 : s.stop - 1]
                     for enc, x, s in zip(self.encoders, xs, self.spans())]

    def forward(self, xs: Inputs, drop: Iterable[int] = (), fill: Inputs | None = None) -> Logits:
        """``xs[i]``: ``(B, d_i)``. Returns fusion logits ``(B, C)`` and the unimodal logits.

        ``drop``: modality indices masked out of attention, or, with ``fill``, whose
        tokens are replaced by ``fill[i]`` ``(T, W)``.
        """
        drop = set(drop)
        cls, toks = self.tokens(xs)
        self.last_features = toks
        self.last_inputs = [x.detach() for x in xs]
        if fill is not None:
            toks = [fill[i].expand_as(t) if i in drop else t for i, t in enumerate(toks)]
        B = cls.shape[0]
        seq = torch.cat([cls] + toks, dim=1)
        keep = None
        if drop and fill is None:
            keep = torch.ones(B, 1, 1, seq.shape[1], dtype=torch.bool, device=seq.device)
            for i in drop:
                keep[..., self.spans()[i]] = False
        out = self.trunk(seq, keep)
        pooled = [out[:, s].mean(dim=1) for s in self.spans()]
        if self.projections is not None:
            # Each embedding sees its own modality only (CLS and its tokens, the same as
            # masking the others out), so that retrieval matches modalities, not copies
            # of the same joint input.
            alone = [self.trunk(torch.cat([cls, t], dim=1))[:, 1:].mean(dim=1) for t in toks]
            self.last_embeddings = [F.normalize(p(h), dim=1) for p, h in zip(self.projections, alone)]
        return self.fusion_head(out[:, 0]), [head(h) for head, h in zip(self.heads, pooled)]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The shared trunk: tokenizers, modality embeddings, CLS, every encoder layer."""
        return [*self.encoders.parameters(), *self.modality.parameters(), *self.cls.parameters(),
                *self.trunk.parameters()]

    def laplace_layers(self) -> dict[str, nn.Module]:
        """Last layer of each classification source (for ``samples="laplace"``)."""
        return {FUSION: self.fusion_head, **dict(zip(self.modalities, self.heads))}

    def param_groups(self) -> list[tuple[list[nn.Parameter], tuple[str, ...]]]:
        """Parameters grouped by the set of loss sources that reach them: the whole trunk by all."""
        groups: list[tuple[list[nn.Parameter], tuple[str, ...]]] = [
            (self.encoder_parameters(), self.sources),
            (list(self.fusion_head.parameters()), (FUSION,)),
        ]
        groups += [(list(h.parameters()), (m,)) for h, m in zip(self.heads, self.modalities)]
        if self.projections is not None:
            groups.append((list(self.projections.parameters()), (ALIGN,)))
        return groups

    @torch.no_grad()
    def modality_confidences(self, y: torch.Tensor) -> torch.Tensor:
        """OGM-GE's ``s_m`` ``(M,)`` for this model: ``sum_i softmax(z^(m)_i)[y_i]``, where
        ``z^(m)`` are the fusion logits with only modality ``m``'s tokens (and CLS) in
        attention, on the last forward's inputs, in eval mode (no dropout)."""
        saved = (self.last_features, self.last_embeddings, self.last_inputs)
        was = self.training
        self.eval()
        xs = list(self.last_inputs)
        M = len(self.modalities)
        scores = []
        for m in range(M):
            z, _ = self(xs, drop=[j for j in range(M) if j != m])
            scores.append(torch.softmax(z, dim=1).gather(1, y[:, None]).sum())
        self.train(was)
        self.last_features, self.last_embeddings, self.last_inputs = saved
        return torch.stack(scores)
