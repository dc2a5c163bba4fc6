"""Per-layer shortcut for ``nn.Linear`` (and ``nn.Conv2d``): statistics from activations.

For a linear layer ``y_i = W x_i + b`` and example losses ``l_i`` that each
depend on one row of the layer's output, the per-example gradients are
``g_i(W) = delta_i x_i^T`` and ``g_i(b) = delta_i`` with
``delta_i = d l_i / d y_i``. Their sums are

    sum_i g_i(W)   = delta^T x               (out, in)
    sum_i g_i(W)^2 = (delta^2)^T (x^2)       (out, in)    elementwise squares

so one backward pass to the layer outputs gives every sufficient statistic
(``n``, ``sum g``, ``sum g^2``) at the cost of two matrix products, with no
``(batch, out, in)`` tensor. Micro-batch gradients are
``g_j(W) = delta_j^T x_j / n_j`` over the rows of chunk ``j``.

For ``nn.Conv2d`` (``groups=1``, zero padding) the per-example gradient is
``g_i(W) = delta_i U_i^T`` with ``U_i = unfold(x_i)`` of shape ``(C k k, L)``
and ``delta_i`` of shape ``(out, L)`` (``L`` output positions): the sum over
positions sits inside the square, so ``sum_i g_i^2`` needs each layer's
per-example gradients, formed here one memory-bounded block of examples at a
time from the layer's own inputs (no backward pass per example); micro-batch
gradients ``sum_{i in j} delta_i U_i^T / n_j`` are one matrix product each.

The layer's forward inputs and outputs are recorded by forward hooks. A layer
falls back to the generic path (exact per-example gradients from autograd)
when it was called more than once in the losses' graph, its input has the
wrong rank (Linear: 2-D; Conv2d: 4-D), its output was modified in place, or
its weight is also used elsewhere in a loss's graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .sharded import layer_type  # FSDP2 gives fully_shard layers a class of their own

__all__ = ["ForwardRecorder", "LinearTaps", "Tap", "supported", "factors", "per_example_sums", "conv_per_example_sums"]


def supported(mod: nn.Module) -> bool:
    """Layers with a shortcut: ``nn.Linear``; ``nn.Conv2d`` with groups=1 and numeric zero padding."""
    if layer_type(mod) is nn.Linear:
        return True
    return (
        isinstance(mod, nn.Conv2d) and layer_type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"
        and not isinstance(mod.padding, str)
    )


def _ranks(mod: nn.Module) -> int:
    return 2 if layer_type(mod) is nn.Linear else 4


@dataclass
class Tap:
    """One recorded call of a linear or convolution layer."""

    @property
    def layer_weight(self) -> torch.Tensor:
        """The layer's weight (a tensor for every supported layer)."""
        w = self.module.weight
        assert isinstance(w, torch.Tensor)
        return w

    module: nn.Module
    x: torch.Tensor  # (N, in) or (N, C, H, W), detached
    out: torch.Tensor  # (N, out) or (N, out, H', W'), part of the graph
    version: int
    weight: int | None  # parameter index of the weight (None: not calibrated)
    bias: int | None


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
                b = mod.bias
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
                r = _ranks(mod)
                if x.dim() == r and out.dim() == r and out._version == version and out.grad_fn is not None:
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


def factors(tap: Tap, dtype: torch.dtype, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with per-example weight gradients ``g_i = A_i^T B_i`` (flattened to ``(out, in')``).

    Linear: ``A = delta[:, None, :]`` ``(N, 1, out)``, ``B = x[:, None, :]``.
    Conv2d: ``A = delta`` as ``(N, L, out)``, ``B = unfold(x)^T`` ``(N, L, C k k)``.
    The per-example bias gradient is ``A_i.sum(0)``.
    """
    mod = tap.module
    d = delta.to(dtype)
    if layer_type(mod) is nn.Linear:
        return d.unsqueeze(1), tap.x.to(dtype).unsqueeze(1)
    assert isinstance(mod, nn.Conv2d) and not isinstance(mod.padding, str)  # see supported()
    U = F.unfold(tap.x.to(dtype), mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                 stride=mod.stride)
    N, out = d.shape[:2]
    return d.reshape(N, out, -1).transpose(1, 2), U.transpose(1, 2)


def conv_per_example_sums(A: torch.Tensor, B: torch.Tensor, with_weight: bool, with_bias: bool,
                          chunk_bytes: int):
    """``(sum g, sum g^2)`` from per-example gradients ``A_i^T B_i`` formed in blocks of examples."""
    N, _, out = A.shape
    inner = B.shape[2]
    per = out * inner * A.element_size()
    R = max(1, int(chunk_bytes // max(per, 1)))
    res = {}
    if with_weight:
        tot = torch.zeros((out, inner), dtype=A.dtype, device=A.device)
        sq = torch.zeros_like(tot)
        for s in range(0, N, R):
            g = torch.bmm(A[s:s + R].transpose(1, 2), B[s:s + R])
            tot += g.sum(dim=0)
            sq += g.mul_(g).sum(dim=0)
        res["weight"] = (tot, sq)
    if with_bias:
        gb = A.sum(dim=1)
        res["bias"] = (gb.sum(dim=0), (gb * gb).sum(dim=0))
    return res
