"""The small interface every training method implements, and shared gradient helpers.

A method turns the per-example losses of each source into ``p.grad`` for every
parameter of a :class:`~.model.MultiModalNet`; the harness then takes the
optimiser step. ``losses[s]`` has shape ``(B,)``; the source names are
``"fusion"`` and the modality names.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..model import ALIGN, FUSION, MultiModalNet


class Method:
    """Base class. Subclasses set ``name`` and implement :meth:`backward`."""

    name = "method"
    #: hyper-parameter grid searched on the validation split (name -> values)
    grid: dict[str, list[Any]] = {}
    #: learning rate; None means the harness default (``TrainConfig.lr``)
    lr: float | None = None
    #: optimiser steps in one epoch, set by the protocol before :meth:`setup`
    steps_per_epoch: int = 1
    #: a rough step cost relative to the sum, only for handing out the longest runs
    #: first to the worker processes (``bogc bench --jobs``)
    cost: float = 1.0

    def setup(self, model: MultiModalNet) -> None:
        """Called once per run, before training (create calibrators, state...)."""
        self.model = model

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Called before each epoch (0-based) of at most ``max_epochs`` (for schedules and windows)."""

    def backward(
        self,
        losses: dict[str, torch.Tensor],
        logits: tuple[torch.Tensor, list[torch.Tensor]],
        y: torch.Tensor,
    ) -> dict[str, Any]:
        """Set ``p.grad`` of every parameter; return diagnostics (may be empty)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr}

    def with_params(self, **params: Any) -> Method:
        """A fresh copy with the given attributes set (used by the validation grid search)."""
        new = copy.copy(self)
        for k, v in params.items():
            if not hasattr(self, k):
                raise AttributeError(f"{self.name}: unknown hyper-parameter {k!r}")
            setattr(new, k, v)
        return new


def source_grads(
    losses: dict[str, torch.Tensor], params: list[torch.nn.Parameter]
) -> dict[str, list[torch.Tensor | None]]:
    """Gradient of each source's mean loss w.r.t. ``params`` (None where it does not reach)."""
    out: dict[str, list[torch.Tensor | None]] = {}
    for s, loss in losses.items():
        out[s] = list(torch.autograd.grad(loss.mean(), params, retain_graph=True, allow_unused=True))
    return out


def fusion_only_grads(model: MultiModalNet, losses: dict[str, torch.Tensor]) -> None:
    """Set ``p.grad`` of every parameter as joint training with detached unimodal heads.

    Every parameter but the unimodal heads' (encoders, fusion head, and in ``zeroshot``
    the projections) gets ``grad mean(L_fusion)``, plus ``grad mean(L_align)`` in
    ``zeroshot`` (the alignment is a joint, cross-modal objective); head ``m`` gets
    ``grad_{theta_m} mean(L_m)``, the gradient of its loss on the *detached* encoder
    features ``head_m(stopgrad(h_m))``: the head's own gradient does not depend on
    whether ``h_m`` is detached, so only the encoders' share of ``L_m`` is dropped.
    """
    heads = [list(h.parameters()) for h in model.heads]
    in_heads = {id(p) for hp in heads for p in hp}
    trunk = [p for p in model.parameters() if id(p) not in in_heads]
    joint = losses[FUSION].mean() + (losses[ALIGN].mean() if ALIGN in losses else 0.0)
    g_trunk = torch.autograd.grad(joint, trunk, retain_graph=True, allow_unused=True)
    g_heads = [torch.autograd.grad(losses[m].mean(), hp, retain_graph=True)
               for m, hp in zip(model.modalities, heads)]
    for p, g in zip(trunk, g_trunk):
        p.grad = None if g is None else g.detach().clone()
    for hp, gs in zip(heads, g_heads):
        for p, g in zip(hp, gs):
            p.grad = g.detach().clone()


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def unflat(v: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


class JointRuleMethod(Method):
    """A method that weights the losses on the Jacobian of all shared parameters.

    ``J`` ``(S, P)`` stacks each loss's gradient with respect to every encoder
    parameter (zeros where a loss does not reach); :meth:`weights` maps the Gram
    matrix ``J J^T`` (float64) to ``w`` ``(S,)`` and the shared parameters get
    ``w^T J``. Every other parameter (a head) gets the sum of the gradients of the
    losses that reach it. ``diag_key`` names the weights in the diagnostics.
    """

    diag_key = "w"
    cost = 2.5  # one backward pass per loss

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, losses, logits, y):
        params = list(self.model.parameters())
        shared = {id(p) for p in self.model.encoder_parameters()}
        g = source_grads(losses, params)
        names = list(losses)
        shared_idx = [i for i, p in enumerate(params) if id(p) in shared]
        J = torch.stack([
            flat([g[s][i] if g[s][i] is not None else torch.zeros_like(params[i]) for i in shared_idx])
            for s in names
        ])
        J64 = J.to(torch.float64)
        # products summed by index, not BLAS: a BLAS product rounds by the buffers'
        # alignment, which differs between processes, and the runs of one seed would too
        gram = torch.stack([(J64 * row).sum(dim=1) for row in J64])
        w = self.weights(gram)
        d = unflat((w[:, None] * J64).sum(dim=0).to(J.dtype), [params[i] for i in shared_idx])
        for i, t in zip(shared_idx, d):
            params[i].grad = t.detach().clone()
        for i, p in enumerate(params):
            if id(p) in shared:
                continue
            reach = [s for s in names if g[s][i] is not None]
            p.grad = sum(g[s][i] for s in reach).detach().clone() if reach else None
        return {f"{self.diag_key}/{s}": float(x) for s, x in zip(names, w)}


class EncoderRuleMethod(Method):
    """A method that combines, per encoder, the gradients of its two sources.

    Heads reached by one source get that source's gradient unchanged (every
    rule below reduces to it for one source). Subclasses implement
    :meth:`combine` on ``grads[k]`` = list of per-tensor gradients of source
    ``k`` (sources ordered ``("fusion", modality)``).
    """

    cost = 2.5  # one backward pass per loss

    def backward(self, losses, logits, y):
        params = list(self.model.parameters())
        index = {id(p): i for i, p in enumerate(params)}
        g = source_grads(losses, params)
        self.context(losses, logits, y)
        diag: dict[str, Any] = {}
        for group, srcs in self.model.param_groups():
            idx = [index[id(p)] for p in group]
            per_src = [[g[s][i] if g[s][i] is not None else torch.zeros_like(params[i]) for i in idx] for s in srcs]
            if len(srcs) == 1:
                new = per_src[0]
            else:
                new = self.combine(per_src, srcs, diag)
            for p, t in zip(group, new):
                p.grad = t.detach().clone()
        return diag

    def context(self, losses, logits, y) -> None:
        """Hook for rules that need batch-level quantities (e.g. OGM-GE's confidences)."""

    def combine(self, grads: list[list[torch.Tensor]], sources: tuple[str, ...], diag: dict) -> list[torch.Tensor]:
        raise NotImplementedError
