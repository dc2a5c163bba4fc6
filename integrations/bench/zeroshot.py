"""The ``zeroshot`` setting: classes never seen in training, recognised by cross-modal retrieval.

**Split.** A fixed split of the classes (seed :data:`CLASS_SEED`, the same for
every run and every method): ``n_unseen = max(3, round(0.3 C))`` unseen classes,
the other ``C - n_unseen`` (about 70 %) seen. Training and validation use the
seen classes' rows of the training split (the usual stratified validation
carve), with labels renumbered ``0..n_seen-1`` for the classification heads. The
test is every row of the unseen classes, from the training and the test split
alike: no model ever sees them, and the larger gallery measures retrieval more
precisely. The seen classes' rows of the test split are not used.

**Model.** Each modality ``m`` gets a projection into a shared embedding of
width :data:`EMBED_DIM`, L2-normalised::

    e_m = P_m(h_m) / ||P_m(h_m)||          (B, EMBED_DIM)

(``h_m``: the MLP encoder's features, or the transformer's mean of modality
``m``'s output tokens).

**Loss source ``align``.** The symmetric InfoNCE over the batch at the fixed
temperature :data:`TEMPERATURE` (not learned), for every pair of modalities
``a < b`` (all pairs: ``M (M - 1) / 2`` of them), per example ``i``::

    S = e_a e_b^T / tau                                        (B, B)
    l_i^{ab} = (CE(S[i, :], i) + CE(S[:, i], i)) / 2
    l_i = mean over pairs (a, b) of l_i^{ab}                   -> losses["align"], (B,)

``mean_i l_i`` is CLIP's loss (Radford et al., 2021) for two modalities. Row
``i``'s loss depends on every row of the batch, so BOGC runs without the
per-layer Linear shortcut in this setting (its chunk samples come from the
generic path: the exact gradient of each micro-batch's mean loss).

**Test.** No labels are used at inference. For every ordered pair of
modalities ``(q, g)``, each test row's ``e_q`` retrieves the test row ``j`` with
the largest cosine similarity ``e_q[i] . e_g[j]`` (first index on ties):

- class accuracy: ``y[j] == y[i]`` (chance ``1 / n_unseen`` for balanced classes);
  ``accuracy`` and ``correct`` (per query, directions concatenated) hold it, so the
  table's ``accuracy_mean`` is the mean over both directions;
- recall@1 of the exact pair: ``j == i`` (chance ``1 / n_test``).

Validation (early stopping, the ``fixed`` choice) is the same class accuracy
among the validation rows (seen classes).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bogc_core.errors import ConfigError

from .metrics import macro_f1
from .model import ALIGN, FUSION, MultiModalNet

#: InfoNCE temperature (fixed; 0.1 as in SimCLR's and many CLIP-style recipes)
TEMPERATURE = 0.1
#: width of the shared embedding
EMBED_DIM = 32
#: seed of the class split (fixed: the same split for every seed and method)
CLASS_SEED = 0
#: fewest classes: 3 unseen and at least 1 seen
MIN_CLASSES = 4
#: fraction of unseen classes (at least 3)
UNSEEN_FRACTION = 0.3


class AlignedNet(MultiModalNet):
    """:class:`.model.MultiModalNet` plus a projection per modality into the shared embedding:
    ``e_m = normalize(P_m h_m)`` ``(B, embed_dim)``, kept in :attr:`last_embeddings`; each
    encoder is reached by ``"fusion"``, its modality and ``"align"``, each projection by
    ``"align"`` only."""

    #: ``align`` couples the rows of a batch (no per-layer shortcut for BOGC)
    rows_independent = False

    def __init__(self, dims: dict[str, int], n_classes: int, hidden: int = 64, feat: int = 32,
                 embed_dim: int = EMBED_DIM):
        if ALIGN in dims:
            raise ConfigError(f"dims: a modality may not be named {ALIGN!r} (reserved for the "
                              f"alignment loss); rename the x_{ALIGN} array")
        super().__init__(dims, n_classes, hidden, feat)
        self.projections = nn.ModuleList(nn.Linear(feat, embed_dim) for _ in dims)
        self.last_embeddings: list[torch.Tensor] = []

    @property
    def sources(self) -> tuple[str, ...]:
        return super().sources + (ALIGN,)

    def forward(self, xs, drop=(), fill=None):
        out = super().forward(xs, drop, fill)
        self.last_embeddings = [F.normalize(p(h), dim=1)
                                for p, h in zip(self.projections, self.last_features)]
        return out

    def param_groups(self) -> list[tuple[list[nn.Parameter], tuple[str, ...]]]:
        groups: list[tuple[list[nn.Parameter], tuple[str, ...]]] = [
            (list(enc.parameters()), (FUSION, m, ALIGN))
            for enc, m in zip(self.encoders, self.modalities)]
        groups.append((list(self.fusion_head.parameters()), (FUSION,)))
        groups += [(list(h.parameters()), (m,)) for h, m in zip(self.heads, self.modalities)]
        groups.append((list(self.projections.parameters()), (ALIGN,)))
        return groups


def class_split(n_classes: int, seed: int = CLASS_SEED) -> tuple[list[int], list[int]]:
    """``(seen, unseen)`` sorted class ids: ``max(3, round(0.3 C))`` unseen, drawn with ``seed``.

    Raises :class:`ConfigError` for fewer than :data:`MIN_CLASSES` classes.
    """
    if n_classes < MIN_CLASSES:
        raise ConfigError(
            f"setting: zeroshot needs at least {MIN_CLASSES} classes (3 unseen at test time and "
            f"at least 1 seen in training); the data set has {n_classes}; choose another "
            f"--setting or a data set with {MIN_CLASSES} or more classes")
    n_unseen = max(3, int(UNSEEN_FRACTION * n_classes + 0.5))
    perm = np.random.default_rng(seed).permutation(n_classes)
    unseen = sorted(int(c) for c in perm[:n_unseen])
    seen = sorted(int(c) for c in perm[n_unseen:])
    return seen, unseen


def info_nce(embeddings: list[torch.Tensor], temperature: float = TEMPERATURE) -> torch.Tensor:
    """Per-example symmetric InfoNCE ``(B,)`` over all modality pairs (module docstring).

    ``embeddings[m]``: ``(B, D)``, L2-normalised rows, the same row order in every modality.
    """
    if len(embeddings) < 2:
        raise ConfigError("embeddings: the alignment loss needs at least 2 modalities")
    B = embeddings[0].shape[0]
    target = torch.arange(B, device=embeddings[0].device)
    pairs = list(itertools.combinations(range(len(embeddings)), 2))
    total = embeddings[0].new_zeros(B)
    for a, b in pairs:
        s = embeddings[a] @ embeddings[b].T / temperature
        total = total + 0.5 * (F.cross_entropy(s, target, reduction="none")
                               + F.cross_entropy(s.T, target, reduction="none"))
    return total / len(pairs)


def retrieval(embeddings: list[np.ndarray], y: np.ndarray) -> dict[str, Any]:
    """Cross-modal nearest-neighbour retrieval among the same rows (module docstring).

    ``embeddings[m]``: ``(n, D)``; ``y``: ``(n,)``. For every ordered pair ``(q, g)``,
    ``q != g``, query ``i`` retrieves ``argmax_j e_q[i] . e_g[j]``. Returns the per-query
    class hits ``correct`` (directions concatenated in ``itertools.permutations`` order),
    the retrieved labels ``pred``, ``accuracy`` (their mean), ``recall_at_1`` (exact pair),
    and both per query modality index (``by_query``: mean over its directions).
    """
    y = np.asarray(y)
    n = y.size
    correct, pred, exact = [], [], []
    by_query: dict[int, list[tuple[float, float]]] = {}
    for q, g in itertools.permutations(range(len(embeddings)), 2):
        sims = np.asarray(embeddings[q], np.float64) @ np.asarray(embeddings[g], np.float64).T
        nn = sims.argmax(axis=1)
        hit = y[nn] == y
        pair = nn == np.arange(n)
        correct.append(hit)
        pred.append(y[nn])
        exact.append(pair)
        by_query.setdefault(q, []).append((float(hit.mean()), float(pair.mean())))
    return {
        "correct": np.concatenate(correct),
        "pred": np.concatenate(pred),
        "accuracy": float(np.concatenate(correct).mean()),
        "recall_at_1": float(np.concatenate(exact).mean()),
        "by_query": {q: (float(np.mean([v[0] for v in vs])), float(np.mean([v[1] for v in vs])))
                     for q, vs in by_query.items()},
    }


@torch.no_grad()
def embed(model: Any, xs: list[torch.Tensor]) -> list[np.ndarray]:
    """The model's L2-normalised embeddings ``(n, D)`` per modality (current train/eval mode)."""
    model(xs)
    return [e.numpy() for e in model.last_embeddings]


@torch.no_grad()
def retrieval_accuracy(model: torch.nn.Module, xs: list[torch.Tensor], y: np.ndarray) -> float:
    """Retrieval class accuracy among the rows ``xs`` (labels ``y``), in eval mode."""
    was = model.training
    model.eval()
    out = retrieval(embed(model, xs), y)["accuracy"]
    model.train(was)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Any, xte: list[torch.Tensor],
             xva: list[torch.Tensor]) -> dict[str, Any]:
    """The test result of a zero-shot run, in the fields :mod:`.report` reads.

    ``correct``/``accuracy``: retrieval class hits (both directions); ``macro_f1``:
    of the retrieved labels; ``unimodal_accuracy[m]``: the class accuracy with ``m``
    as the query modality; ``recall_at_1`` and ``recall_at_1_by_query`` likewise for
    the exact pair.
    """
    was = model.training
    model.eval()
    r = retrieval(embed(model, xte), split.y_test)
    classes = np.array(split.info["unseen_classes"])
    ids = {int(c): i for i, c in enumerate(classes)}
    y_rep = np.tile(split.y_test, len(r["correct"]) // split.y_test.size)
    out = {
        "correct": r["correct"],
        "accuracy": r["accuracy"],
        "macro_f1": macro_f1(np.array([ids[int(c)] for c in y_rep]),
                             np.array([ids[int(c)] for c in r["pred"]]), classes.size),
        "val_accuracy": retrieval(embed(model, xva), split.y_val)["accuracy"],
        "unimodal_accuracy": {m: r["by_query"][i][0] for i, m in enumerate(split.modalities)},
        "recall_at_1": r["recall_at_1"],
        "recall_at_1_by_query": {m: r["by_query"][i][1] for i, m in enumerate(split.modalities)},
    }
    model.train(was)
    return out


def summary(runs: dict[str, list[dict]], split_info: dict[str, Any]) -> dict[str, Any]:
    """The ``zeroshot`` record of ``results.json``: definitions, chance levels, recall@1."""
    n_unseen = len(split_info["unseen_classes"])
    methods = {}
    for name, rs in runs.items():
        res = [r["results"]["plateau"] for r in rs]
        methods[name] = {
            "recall_at_1s": [float(x["recall_at_1"]) for x in res],
            "recall_at_1_mean": float(np.mean([x["recall_at_1"] for x in res])),
            "recall_at_1_by_query_mean": {
                m: float(np.mean([x["recall_at_1_by_query"][m] for x in res]))
                for m in res[0]["recall_at_1_by_query"]},
        }
    return {
        "metric": "accuracy_mean is the top-1 retrieval class accuracy among the unseen-class "
                  "test rows, averaged over both directions of every modality pair; "
                  "unimodal_accuracy[m] is that accuracy with m as the query modality",
        "temperature": TEMPERATURE,
        "embedding_dim": EMBED_DIM,
        "class_seed": CLASS_SEED,
        "chance_class_accuracy": 1.0 / n_unseen,
        "chance_recall_at_1": 1.0 / split_info["n_test"],
        "methods": methods,
    }


__all__ = ["ALIGN", "EMBED_DIM", "TEMPERATURE", "class_split", "evaluate", "info_nce", "retrieval",
           "retrieval_accuracy", "summary"]
