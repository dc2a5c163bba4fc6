"""Laplace Monte Carlo gradient samples (``docs/method.md``, Stage 0; the paper's route).

For source ``k`` with last layer ``h`` (weights ``W``, named by the user):

1. Diagonal Laplace posterior of ``W``: precision ``F + lambda0`` with ``F``
   the empirical Fisher diagonal ``sum_i (d l_i / d W)^2`` of the batch (the
   GGN diagonal for a negative log-likelihood loss, estimated from the
   per-example gradients) and ``lambda0`` the prior precision. For an
   ``nn.Linear`` last layer ``F = (delta^2)^T (x^2)`` from its recorded input
   and output gradients (one backward); other layers use batched
   per-example gradient rows.
2. ``T`` draws ``W_t = W + delta_t``, ``delta_t ~ N(0, diag(1 / (F + lambda0)))``,
   as ``T / 2`` antithetic pairs ``(+delta, -delta)``.
3. The source's gradient of ``loss.mean()`` on every parameter it reaches, at
   each draw, to first order in ``delta_t``:
   ``g_t = g + (d^2 L / d theta d W) delta_t``, one mixed Hessian-vector product
   per draw, all ``T`` in one batched double-backward.
4. Moment matching: ``n = T``, ``m = g`` (the antithetic draws' exact mean),
   ``M2 = sum_t (g_t - g)^2``.

The first-order step avoids a forward pass per draw (the loss function need
not be known); it is exact when the shared parameters' gradient is linear in
the last layer's weights and otherwise the delta-method approximation of the
draws' spread.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from bogc_core.errors import ConfigError, InsufficientSamplesError

from .distributed import allreduce_sum
from .graph import walk
from .samples import Moments, Problem, SourceStats, Stats, batched_grads, work_dtype
from .sharded import compute_tensors, layer_type
from .shortcut import ForwardRecorder
from .source import SampleContext, SampleSource

__all__ = ["Laplace"]


class Laplace(ForwardRecorder, SampleSource):
    """Diagonal last-layer Laplace draws for every source (see module docstring).

    ``layers``: mapping source name -> the last layer (an ``nn.Module``) of
    that source's modality; ``prior_precision`` > 0: the posterior's prior
    precision ``lambda0``; ``draws``: Monte Carlo draws ``T`` (even:
    antithetic pairs); ``seed``: seed of the calibrator's random generator
    (every rank must use the same); ``rho`` and ``chunk_bytes`` as in
    :class:`~.source.SampleSource`. Forward hooks on Linear layers record
    their input and output from construction until :meth:`remove`.
    """

    NAME = "laplace"
    REDUCES_ITSELF = True

    def __init__(
        self,
        layers: Mapping[str, nn.Module] | None = None,
        *,
        prior_precision: float = 1.0,
        draws: int = 8,
        seed: int = 0,
        rho: float | None = None,
        chunk_bytes: int | None = None,
    ) -> None:
        ForwardRecorder.__init__(self)
        SampleSource.__init__(self, rho, chunk_bytes)
        if not isinstance(layers, Mapping) or not layers:
            raise ConfigError(
                "Laplace(layers=): needs a mapping source name -> the last layer (an nn.Module) "
                "of that source's modality, e.g. Laplace(layers={'audio': model.audio_head})"
            )
        self.layers: dict[str, list[torch.Tensor]] = {}  # parameters of each source's layer
        self.module_of: dict[str, nn.Module] = {}
        for name, mod in layers.items():
            if not isinstance(mod, nn.Module):
                raise ConfigError(f"Laplace(layers=)[{name!r}]: expected an nn.Module, got {type(mod).__name__}")
            ps: list[torch.Tensor] = [p for p in mod.parameters() if p.requires_grad]
            if not ps:
                raise ConfigError(f"Laplace(layers=)[{name!r}]: the layer has no trainable parameters")
            self.layers[str(name)] = ps
            self.module_of[str(name)] = mod
        if (isinstance(prior_precision, bool) or not isinstance(prior_precision, (int, float))
                or not prior_precision > 0):
            raise ConfigError(f"Laplace(prior_precision=): must be a number > 0, got {prior_precision!r}")
        if not (isinstance(draws, int) and not isinstance(draws, bool) and draws >= 2 and draws % 2 == 0):
            raise ConfigError(
                f"Laplace(draws=): must be an even int >= 2 (antithetic pairs), got {draws!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"Laplace(seed=): must be an int, got {type(seed).__name__}")
        self.prior_precision = float(prior_precision)
        self.draws = draws
        self.seed = seed
        # Linear last layers: record (input, output) so that the Fisher diagonal
        # comes from the per-layer identity sum_i g_i^2 = (delta^2)^T (x^2).
        for name, mod in layers.items():
            if layer_type(mod) is nn.Linear:
                self._watch(mod, str(name))

    def _fisher_linear(self, name: str, loss: torch.Tensor, head: list[torch.Tensor]):
        """Fisher diagonal of a Linear last layer from its recorded call, or None."""
        recs = [r for r in self._records.get(name, ()) if r[1].grad_fn is not None]
        if len(recs) != 1:
            return None
        x, out, version = recs[0]
        if x.dim() != 2 or out.dim() != 2 or out._version != version or out.shape[0] != loss.shape[0]:
            return None
        try:
            (delta,) = torch.autograd.grad(loss.sum(), out, retain_graph=True)
        except RuntimeError:  # the recorded call is not in this loss's graph
            return None
        mod = self.module_of[name]
        assert isinstance(mod, nn.Linear)  # only Linear layers (FSDP2's included) are recorded
        dt = work_dtype(mod.weight)
        d2, x2 = delta.to(dt).square(), x.to(dt).square()
        # ``head`` holds the tensors the graph reaches (FSDP2: the unsharded ones).
        wb = compute_tensors([mod.weight] + ([] if mod.bias is None else [mod.bias]),
                             f"Laplace(layers=)[{name!r}]")
        by_id = {id(wb[0]): d2.T @ x2}
        if len(wb) > 1:
            by_id[id(wb[1])] = d2.sum(dim=0)
        if any(id(h) not in by_id for h in head):
            return None
        return [by_id[id(h)] for h in head]

    def _fisher(self, loss: torch.Tensor, head: list[torch.Tensor], chunk_bytes: int) -> list[torch.Tensor]:
        B = int(loss.shape[0])
        per_row = sum(h.numel() * h.element_size() for h in head)
        R = max(1, min(B, int(chunk_bytes // max(per_row, 1))))
        F = [torch.zeros_like(h, dtype=work_dtype(h)) for h in head]
        for start in range(0, B, R):
            idx = torch.arange(start, min(B, start + R), device=loss.device)
            cot = torch.zeros((len(idx), B), dtype=loss.dtype, device=loss.device)
            cot[torch.arange(len(idx)), idx] = 1.0
            rows = batched_grads([loss], [cot], head)
            for f, r in zip(F, rows):
                r = r.to(f.dtype)
                f += (r * r).sum(dim=0)
        return F

    def options(self) -> dict[str, Any]:
        return {"layers": sorted(self.layers), "prior_precision": self.prior_precision,
                "draws": self.draws, "seed": self.seed, **super().options()}

    def sample(self, prob: Problem, ctx: SampleContext) -> SourceStats:
        return self.draw(prob, ctx.generator, self.bound(ctx), ctx.group, ctx.timeout)

    def draw(self, prob: Problem, generator: torch.Generator, chunk_bytes: int, group: Any,
             timeout: timedelta | None = None) -> SourceStats:
        missing = [s for s in prob.names if s not in self.layers]
        if missing:
            raise ConfigError(
                f"Laplace(layers=): no last layer named for source(s) {missing}; give every "
                f"source's modality head, e.g. Laplace(layers={{{missing[0]!r}: model.head}})"
            )
        for k, s in enumerate(prob.names):
            if prob.losses[k].dim() != 1 or prob.batch(k) < 1:
                raise InsufficientSamplesError(
                    f"losses[{s!r}]: the Laplace posterior needs per-example losses of shape (batch,)"
                )
        for k, s in enumerate(prob.names):
            head = compute_tensors(self.layers[s], f"Laplace(layers=)[{s!r}]")
            reached = walk(prob.losses[k], {id(h): j for j, h in enumerate(head)}).params
            if not reached:
                raise ConfigError(
                    f"Laplace(layers=)[{s!r}]: the layer is not in the graph of losses[{s!r}] (none "
                    f"of its parameters reaches that loss); name the last layer that produces "
                    f"source {s!r}'s output, e.g. Laplace(layers={{{s!r}: model.head_{s}}})"
                )
        # Phase 1: Fisher diagonals (summed over ranks: the global batch's posterior).
        fishers = []
        for k, s in enumerate(prob.names):
            head = compute_tensors(self.layers[s], f"Laplace(layers=)[{s!r}]")
            f = self._fisher_linear(s, prob.losses[k], head)
            fishers.append(f if f is not None else self._fisher(prob.losses[k], head, chunk_bytes))
        batch = [float(prob.batch(k)) for k in range(len(prob.names))]
        if group is not None:
            flat = [f for fs in fishers for f in fs]
            red = allreduce_sum(flat + [torch.tensor(batch, dtype=torch.float64)], group, timeout)
            it = iter(red[:-1])
            fishers = [[next(it) for _ in fs] for fs in fishers]
            totals = red[-1].tolist()
        else:
            totals = batch
        # Phase 2: mean gradient and T linearised draws per source.
        results: list[tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = []
        T = self.draws
        for k, s in enumerate(prob.names):
            head = compute_tensors(self.layers[s], f"Laplace(layers=)[{s!r}]")
            targets = sorted(prob.reach[k])
            if not targets:
                # The source reaches no calibrated parameter: it has nothing to sample
                # (as with the other sample sources), and autograd takes no empty inputs.
                results.append(([], [], []))
                continue
            tparams = [prob.params[i] for i in targets]
            inputs, seen = [], set()
            for t in head + tparams:
                if id(t) not in seen:
                    seen.add(id(t))
                    inputs.append(t)
            pos = {id(t): j for j, t in enumerate(inputs)}
            # The local share of the global mean loss, so that the sum over ranks is the global mean.
            L = prob.losses[k].sum() / totals[k]
            g_all = torch.autograd.grad(L, inputs, create_graph=True, allow_unused=True, materialize_grads=True)
            gH = [g_all[pos[id(h)]] for h in head]
            g = [g_all[pos[id(t)]].detach() for t in tparams]
            deltas = []
            for h, f in zip(head, fishers[k]):
                std = (f + self.prior_precision).rsqrt()
                eps = torch.randn((T // 2,) + tuple(h.shape), generator=generator, dtype=std.dtype)
                eps = eps.to(std.device) * std
                deltas.append(torch.cat([eps, -eps]).to(gH[0].dtype))
            live = [(gh, d) for gh, d in zip(gH, deltas) if gh.requires_grad]
            if live:
                v = batched_grads([x for x, _ in live], [d for _, d in live], tparams)
            else:
                v = [torch.zeros((T,) + tuple(t.shape), dtype=t.dtype, device=t.device) for t in tparams]
            results.append((targets, g, v))
        if group is not None:
            flat = [x for _, g, v in results for x in g + v]
            red = allreduce_sum(flat, group, timeout)
            it = iter(red)
            results = [(targets, [next(it) for _ in g], [next(it) for _ in v]) for targets, g, v in results]
        out: SourceStats = {}
        for (targets, g, v), s in zip(results, prob.names):
            per: dict[int, Stats] = {}
            for i, gi, vi in zip(targets, g, v):
                dt = work_dtype(prob.params[i])
                vi = vi.to(dt)
                per[i] = Moments(float(T), gi.to(dt), (vi * vi).sum(dim=0))
            out[s] = per
        return out
