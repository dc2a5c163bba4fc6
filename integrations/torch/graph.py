"""Which parameters (and which captured layer outputs) each loss reaches.

A walk over the autograd graph from a loss's ``grad_fn``: a parameter is
reached when its ``AccumulateGrad`` node is. The walk is structural (no
backward pass), so a parameter whose gradient happens to be exactly zero
still counts as reached, which is what the statistics want: a zero gradient
is a sample.

Reentrant gradient checkpointing (``torch.utils.checkpoint.checkpoint(...,
use_reentrant=True)``) runs its block's forward without autograd and rebuilds
the graph only inside the backward pass, so the parameters of the block are
invisible to any walk; :attr:`Reach.opaque` counts such nodes so that the
caller can refuse them rather than skip those parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["OPAQUE", "Reach", "walk"]


@dataclass
class Reach:
    """Result of :func:`walk` for one loss.

    ``params``: indices (into the calibrator's parameter list) reached.
    ``nodes``: ids of the extra nodes asked about (layer outputs) reached.
    ``fan_in``: for each reached parameter, the number of graph edges that
    end in its ``AccumulateGrad`` node (more than one means the tensor is used
    in several places, for instance tied weights).
    ``sparse``: reached parameters whose gradient is sparse (an
    ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``).
    ``compiled``: the graph runs through code compiled by ``torch.compile``
    (AOTAutograd's ``CompiledFunctionBackward``): one node for the whole
    compiled region, which reaches every parameter of that region whatever
    the loss actually depends on.
    ``opaque``: the number of nodes whose parameters no walk can see (:data:`OPAQUE`).
    ``parents``: for each extra node asked about, the nodes with an edge into it
    (one entry per edge).
    """

    params: set[int] = field(default_factory=set)
    nodes: set[int] = field(default_factory=set)
    fan_in: dict[int, int] = field(default_factory=dict)
    sparse: set[int] = field(default_factory=set)
    compiled: bool = False
    opaque: int = 0
    parents: dict[int, list[Any]] = field(default_factory=dict)


# Nodes whose backward runs a forward and backward of its own that no walk can see.
OPAQUE = ("CheckpointFunctionBackward",)


def walk(loss: torch.Tensor, param_index: dict[int, int], node_ids: Iterable[int] = ()) -> Reach:
    """Walk the graph of ``loss``; ``param_index`` maps ``id(parameter)`` -> index."""
    wanted = set(node_ids)
    out = Reach()
    root = loss.grad_fn
    if root is None:
        # A loss that is itself a leaf parameter.
        if id(loss) in param_index:
            idx = param_index[id(loss)]
            out.params.add(idx)
            out.fan_in[idx] = 1
        return out
    seen: set[int] = set()
    stack: list[Any] = [root]
    seen.add(id(root))
    while stack:
        node = stack.pop()
        if id(node) in wanted:
            out.nodes.add(id(node))
        if type(node).__name__ == "CompiledFunctionBackward":
            out.compiled = True
        if type(node).__name__ in OPAQUE:
            out.opaque += 1
        var = getattr(node, "variable", None)
        if var is not None and id(var) in param_index:
            out.params.add(param_index[id(var)])
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if id(nxt) in wanted:
                out.parents.setdefault(id(nxt), []).append(node)
            v = getattr(nxt, "variable", None)
            if v is not None and id(v) in param_index:
                i = param_index[id(v)]
                out.fan_in[i] = out.fan_in.get(i, 0) + 1
                # Embedding(Bag)Backward with sparse=True hands the parameter a sparse
                # gradient (looked up only on the edges into a parameter).
                if getattr(node, "_saved_sparse", False) is True:
                    out.sparse.add(i)
            if id(nxt) not in seen:
                seen.add(id(nxt))
                stack.append(nxt)
    return out


