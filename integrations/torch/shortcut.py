"""Per-layer shortcut: statistics from each layer's recorded input and output gradient.

For a layer call ``out = f(x; theta)`` and example losses ``l_i`` that each
depend on their own rows of the output only, the per-example gradient of
``theta`` is a function of the example's input ``x_i`` and output gradient
``delta_i = d l_i / d out_i`` alone (the formulas per layer type are in
:mod:`.layer_grads`). So one backward pass to the layer outputs gives every
sufficient statistic (``n``, ``sum g``, ``sum g^2``) without a backward pass
per example. For a Linear layer on 2-D inputs ``y_i = W x_i + b``:

    sum_i g_i(W)   = delta^T x               (out, in)
    sum_i g_i(W)^2 = (delta^2)^T (x^2)       (out, in)    elementwise squares

Layers with a shortcut: ``nn.Linear`` on inputs of any rank ``(N, ..., in)``
(the middle axes, a sequence for instance, are summed inside each example's
gradient), ``nn.Conv2d`` (``groups=1``, numeric zero padding), ``nn.Embedding``
(dense gradients, no ``max_norm`` or ``scale_grad_by_freq``) on index tensors
``(N, ...)``, and ``nn.LayerNorm`` with affine parameters on ``(N, ..., *shape)``.

The layer's forward inputs and outputs are recorded by forward hooks (not
while autograd runs a backward pass: gradient checkpointing's recomputation
of a forward is not a new call). A layer falls back to the generic path
(exact per-example gradients from autograd) when it was called more than once
in the losses' graph, its input has the wrong rank, its output was modified
in place, or its weight is also used elsewhere in a loss's graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .sharded import layer_type  # FSDP2 gives fully_shard layers a class of their own

__all__ = ["ForwardRecorder", "LinearTaps", "Tap", "broadcast_parent", "in_backward", "per_example_sums", "supported"]


def supported(mod: nn.Module) -> bool:
    """Layers with a shortcut (see the module docstring)."""
    kind = layer_type(mod)
    if kind is nn.Linear:
        return True
    if kind is nn.Embedding:
        assert isinstance(mod, nn.Embedding)
        return not mod.sparse and mod.max_norm is None and not mod.scale_grad_by_freq
    if kind is nn.LayerNorm:
        assert isinstance(mod, nn.LayerNorm)
        return isinstance(mod.weight, torch.Tensor)
    return (
        isinstance(mod, nn.Conv2d) and kind is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"
        and not isinstance(mod.padding, str)
    )


def _fits(mod: nn.Module, x: torch.Tensor, out: torch.Tensor) -> bool:
    """The call's input and output have the layout the layer's formulas assume."""
    kind = layer_type(mod)
    if kind is nn.Linear:
        return x.dim() >= 2 and out.dim() == x.dim() and x.is_floating_point()
    if kind is nn.Embedding:
        return x.dim() >= 1 and out.dim() == x.dim() + 1 and not x.is_floating_point()
    if kind is nn.LayerNorm:
        assert isinstance(mod, nn.LayerNorm)
        return x.dim() > len(mod.normalized_shape) and out.shape == x.shape
    return x.dim() == 4 and out.dim() == 4


def broadcast_parent(tap: Tap, parents: list[Any], batch: int) -> Any:
    """The node through which a batch-1 Embedding output reaches a batch of ``batch`` rows, or None.

    Only ``a + out`` with ``out`` broadcast along the batch axis qualifies: the
    gradient of the sum's example ``i`` is then the gradient of ``out`` for
    example ``i`` (``alpha`` must be 1 and the sum's shape ``(batch, *out.shape[1:])``).
    """
    if layer_type(tap.module) is not nn.Embedding or tap.out.shape[0] != 1 or batch == 1:
        return None
    if len(parents) != 1 or type(parents[0]).__name__ != "AddBackward0":
        return None
    node = parents[0]
    if getattr(node, "_saved_alpha", None) != 1:
        return None
    meta = node._input_metadata
    if len(meta) != 1 or tuple(meta[0].shape) != (batch,) + tuple(tap.out.shape[1:]):
        return None
    return node


def in_backward() -> bool:
    """Autograd is running a backward pass (a checkpointed forward being recomputed)."""
    return bool(torch._C._current_graph_task_id() != -1)


@dataclass
class Tap:
    """One recorded call of a layer with a shortcut."""

    @property
    def layer_weight(self) -> torch.Tensor:
        """The layer's weight (a tensor for every supported layer)."""
        w = self.module.weight
        assert isinstance(w, torch.Tensor)
        return w

    module: nn.Module
    x: torch.Tensor  # the layer's input (N, ...), detached
    out: torch.Tensor  # its output (N, ...), part of the graph
    version: int
    weight: int | None  # parameter index of the weight (None: not calibrated)
    bias: int | None
    # A call whose output has one row broadcast over the batch (position embeddings):
    # the node adding it to a batched tensor, whose output gradient is the per-example one.
    via: Any = None


class ForwardRecorder:
    """Forward hooks that record ``(input, output, output version)`` per key.

    Shared by the Linear/Conv2d shortcut and the Laplace Fisher: both need a
    layer's detached input and its live output from the current forward pass.
    """

    def __init__(self) -> None:
        self._records: dict[Any, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self._handles: list[Any] = []

    def _watch(self, mod: nn.Module, key: Any) -> None:
        def hook(mod: nn.Module, inputs: tuple, out: Any) -> None:
            if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad):
                return
            if in_backward():
                return
            x = inputs[0] if inputs else None
            if isinstance(x, torch.Tensor):
                self._records.setdefault(key, []).append((x.detach(), out, out._version))

        self._handles.append(mod.register_forward_hook(hook))

    def clear(self) -> None:
        self._records.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._records.clear()


class LinearTaps(ForwardRecorder):
    """Forward hooks on the supported layers of ``model`` whose weight is calibrated."""

    def __init__(self, model: nn.Module, param_index: dict[int, int]) -> None:
        super().__init__()
        self._index: dict[nn.Module, tuple[int | None, int | None]] = {}
        for mod in model.modules():
            if supported(mod) and id(mod.weight) in param_index:
                b = getattr(mod, "bias", None)
                self._index[mod] = (
                    param_index[id(mod.weight)],
                    param_index.get(id(b)) if b is not None else None,
                )
                self._watch(mod, mod)

    def __len__(self) -> int:
        return len(self._index)

    def candidates(self) -> list[Tap]:
        """Recorded calls of the right rank whose output was not modified in place.

        A layer may have several records (forwards whose loss was never passed
        to this calibrator); the caller keeps a layer only if exactly one of
        its records lies in the current losses' graph.
        """
        taps = []
        for mod, recs in self._records.items():
            w, b = self._index[mod]
            for x, out, version in recs:
                if _fits(mod, x, out) and out._version == version and out.grad_fn is not None:
                    taps.append(Tap(mod, x, out, version, w, b))
        return taps


def per_example_sums(x: torch.Tensor, delta: torch.Tensor, with_weight: bool, with_bias: bool):
    """``(sum g, sum g^2)`` for weight and bias from inputs ``x (N, in)`` and ``delta (N, out)``."""
    out = {}
    if with_weight:
        out["weight"] = (delta.T @ x, (delta * delta).T @ (x * x))
    if with_bias:
        out["bias"] = (delta.sum(dim=0), (delta * delta).sum(dim=0))
    return out
