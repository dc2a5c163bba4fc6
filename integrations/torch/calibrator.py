"""``GradientCalibrator``: BOGC in an ordinary PyTorch training loop.

::

    cal = GradientCalibrator(model.named_parameters(), samples="microbatch")
    losses = {"audio": ce(out_a, y), "video": ce(out_v, y), "fusion": ce(out, y)}  # (batch,) each
    cal.backward(losses)          # instead of sum(l.mean() for l in losses).backward()
    optimizer.step()

For each source ``k`` and each parameter it reaches, gradient samples give
``GradientStats`` (docs/method.md, Stage 0); every parameter reached by two or
more sources is calibrated with :func:`bogc_core.calibrate_tensors` (Stages
1-5, grouped by ``config.scope``) and ``p.grad`` is set to ``g_hat``. With
equal evidence everywhere ``g_hat = sum_k lambda_k * grad(loss_k.mean())``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from bogc_core import CalibrationConfig, GradientStats, calibrate, calibrate_tensors
from bogc_core.errors import ConfigError, NonFiniteError, ShapeError

from . import samples as _samples
from .collective_step import agree, sample_and_reduce
from .distributed import Agreement, active_group
from .graph import walk
from .sharded import compute_params, layer_type, local_grad
from .shortcut import LinearTaps
from .state import StepState

__all__ = ["GradientCalibrator", "SAMPLES"]

SAMPLES = ("per_example", "microbatch", "laplace", "steps")


def _named(params: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    items = list(params)
    if not items:
        raise ConfigError("params: empty; pass model.parameters() or model.named_parameters()")
    out: list[tuple[str, torch.Tensor]] = []
    for j, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, p = item
        else:
            name, p = f"param{j}", item
        if not isinstance(p, torch.Tensor):
            raise ConfigError(
                f"params[{j}]: expected a torch.Tensor parameter or a (name, parameter) pair, "
                f"got {type(p).__name__}"
            )
        if not (p.is_leaf and p.requires_grad and p.is_floating_point()):
            raise ConfigError(
                f"params[{j}] ({name!r}): must be a floating leaf tensor with requires_grad=True "
                f"(an nn.Parameter); pass the model's trainable parameters only"
            )
        out.append((name, p))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError("params: duplicate names; pass each parameter once")
    if len({id(p) for _, p in out}) != len(out):
        raise ConfigError("params: the same tensor appears twice; pass each parameter once")
    return out


def _all_finite(scalars: list[torch.Tensor]) -> list[bool]:
    """``isfinite`` of each 0-d tensor, with one host sync per device."""
    by_dev: dict[torch.device, list[int]] = {}
    for j, t in enumerate(scalars):
        by_dev.setdefault(t.device, []).append(j)
    out = [True] * len(scalars)
    for idx in by_dev.values():
        flags = torch.isfinite(torch.stack([scalars[j].double() for j in idx])).tolist()
        for j, ok in zip(idx, flags):
            out[j] = ok
    return out


class GradientCalibrator:
    """Calibrated multi-source gradients for a set of parameters.

    Parameters
    ----------
    params : iterable of parameters or of ``(name, parameter)`` pairs
        The parameters whose gradients are calibrated (names key the
        diagnostics and the state dict; default ``param0``, ``param1``...).
    config : CalibrationConfig
        Options of docs/method.md (``scope`` groups tensors, ``backend`` picks the
        fused path).
    samples : {"microbatch", "per_example", "laplace", "steps"}
        Where the gradient samples come from (docs/integrations.md, "The four sample sources").
    chunks : int
        Micro-batches per source and step (``samples="microbatch"``).
    rho : float in [0, 1] or None
        Forgetting factor for statistics carried across steps. ``None``:
        0.9 with ``samples="steps"``, no carrying otherwise. With any other
        sample source a ``rho`` pools each step's statistics with the decayed
        earlier ones.
    process_group : torch.distributed ProcessGroup or None
        Group to all-reduce statistics over; ``None`` uses the default group
        when ``torch.distributed`` is initialised.
    source_weights : mapping source -> float or None
        Fixed ``lambda_k``, applied after calibration.
    model : nn.Module, optional (keyword)
        Enables the per-layer shortcut for its ``nn.Linear`` and
        ``nn.Conv2d`` layers (``per_example`` and ``microbatch``): forward
        hooks record each layer's input and output, and one backward to the
        layer outputs gives every source's statistics (no backward pass per
        example). It assumes each example's loss depends on its own row of
        the layer's output only (no batch norm or attention across the batch
        after the layer); leave ``model`` out otherwise.
    laplace_layers : mapping source -> nn.Module (keyword)
        ``samples="laplace"``: the last layer of each source's modality. Its
        weights get a diagonal Laplace posterior (empirical Fisher + prior
        precision) from which ``draws`` weight perturbations are drawn.
    prior_precision : float (keyword)
        Prior precision of the Laplace posterior (default 1).
    draws : int (keyword)
        Monte Carlo draws ``T`` for ``laplace`` (even; antithetic pairs).
    chunk_bytes : int (keyword)
        Memory bound of one batch of per-example gradient rows.
    seed : int (keyword)
        Seed of the calibrator's own random generator (Laplace draws). Every
        rank must use the same seed.
    timeout : datetime.timedelta or None (keyword)
        Wait at most this long for the all-reduce; ``None`` uses the process
        group's timeout.
    on_nonfinite : {"raise", "plain"} (keyword)
        What to do when a gradient sample is NaN or infinite: raise
        :class:`~bogc_core.NonFiniteError` (no ``p.grad`` changes), or write
        the plain summed gradient (with its non-finite values, so that a
        ``GradScaler`` skips the step). ``backward(..., grad_scaler=...)``
        implies ``"plain"``.
    diagnostics : {"summary", "full", "none"} (keyword)
        What :meth:`backward` reports per calibrated parameter: ``"summary"``
        (mean weight and evidence per source, fused uncertainty, belief-scale
        range; one device sync per step), ``"full"`` (the core's complete
        :attr:`Calibration.diagnostics`, several syncs per tensor), or
        ``"none"`` (counts and flags only, no per-parameter entries).
    keep_statistics : bool (keyword)
        Keep the statistics of the last step in :attr:`last_statistics`
        (source -> parameter name -> ``GradientStats``) for inspection; off
        by default because it holds ``2 S`` parameter copies between steps.
    """

    def __init__(
        self,
        params: Iterable[Any],
        config: CalibrationConfig | None = None,
        samples: str = "microbatch",
        chunks: int = 4,
        rho: float | None = None,
        process_group: Any = None,
        source_weights: Mapping[str, float] | None = None,
        *,
        model: nn.Module | None = None,
        laplace_layers: Mapping[str, nn.Module] | None = None,
        prior_precision: float = 1.0,
        draws: int = 8,
        chunk_bytes: int = 1 << 26,
        seed: int = 0,
        timeout: timedelta | None = None,
        on_nonfinite: str = "raise",
        diagnostics: str = "summary",
        keep_statistics: bool = False,
    ) -> None:
        self._params = _named(params)
        self._index = {id(p): i for i, (_, p) in enumerate(self._params)}
        self.config = CalibrationConfig() if config is None else config
        if not isinstance(self.config, CalibrationConfig):
            raise ConfigError(f"config: expected CalibrationConfig, got {type(self.config).__name__}")
        if samples not in SAMPLES:
            raise ConfigError(f"samples: must be one of {SAMPLES}, got {samples!r}")
        self.samples = samples
        if not (isinstance(chunks, int) and chunks >= 2):
            raise ConfigError(f"chunks: must be an int >= 2 (micro-batches per step), got {chunks!r}")
        self.chunks = chunks
        if rho is None and samples == "steps":
            rho = 0.9
        if rho is not None:
            rho = float(rho)
            if not 0.0 <= rho <= 1.0:
                raise ConfigError(f"rho: must lie in [0, 1] (1 keeps every step), got {rho}")
            if samples == "steps" and self.config.prior.beta0 is None and rho <= 0.5:
                raise ConfigError(
                    f"rho: {rho} <= 0.5 keeps fewer than 2 effective steps (1 / (1 - rho)), so the "
                    f"variance is never identified; use rho > 0.5 (0.9 is the default) or give "
                    f"NormalGammaPrior(beta0=...) in config.prior"
                )
        self.rho = rho
        self._state = StepState(rho) if rho is not None else None
        self.process_group = process_group
        self._agreement = Agreement()  # per-step check in a process group (docs/distributed.md)
        if source_weights is not None:
            if not isinstance(source_weights, Mapping):
                raise ConfigError("source_weights: expected a mapping source name -> float, or None")
            bad = {k: v for k, v in source_weights.items() if not math.isfinite(float(v))}
            if bad:
                raise ConfigError(f"source_weights: must be finite numbers, got {bad}")
            source_weights = {str(k): float(v) for k, v in source_weights.items()}
        self.source_weights = source_weights
        if on_nonfinite not in ("raise", "plain"):
            raise ConfigError(f"on_nonfinite: must be 'raise' or 'plain', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        if diagnostics not in ("summary", "full", "none"):
            raise ConfigError(f"diagnostics: must be 'summary', 'full' or 'none', got {diagnostics!r}")
        self.diagnostics = diagnostics
        self.keep_statistics = bool(keep_statistics)
        if not (isinstance(chunk_bytes, int) and chunk_bytes > 0):
            raise ConfigError(f"chunk_bytes: must be a positive int, got {chunk_bytes!r}")
        self.chunk_bytes = chunk_bytes
        self.timeout = timeout
        self._taps = None
        if model is not None:
            if not isinstance(model, nn.Module):
                raise ConfigError(f"model: expected an nn.Module, got {type(model).__name__}")
            if samples in ("per_example", "microbatch"):
                self._taps = LinearTaps(model, self._index)
        self._laplace = None
        if samples == "laplace":
            from .laplace import LaplaceSource

            self._laplace = LaplaceSource(
                laplace_layers, self._index, prior_precision=prior_precision, draws=draws
            )
        elif laplace_layers is not None:
            raise ConfigError("laplace_layers: only used with samples='laplace'")
        self._generator = torch.Generator().manual_seed(int(seed))
        #: source -> parameter name -> GradientStats used by the last backward
        #: (unscaled); filled only with keep_statistics=True.
        self.last_statistics: dict[str, dict[str, GradientStats]] = {}

    # ----------------------------------------------------------------- public
    @property
    def param_names(self) -> list[str]:
        return [n for n, _ in self._params]

    def backward(self, losses: Mapping[str, torch.Tensor], grad_scaler: Any = None) -> dict[str, Any]:
        """Set ``p.grad`` to the calibrated gradient and return the diagnostics.

        ``losses`` maps a source name to its per-example losses ``(batch,)``
        (``reduction="none"``), or to a scalar with ``samples="steps"``. A
        source with an empty loss vector sits this step out. With
        ``grad_scaler`` (an enabled ``torch.amp.GradScaler``), pass the
        *unscaled* losses: they are scaled here before backward, the
        statistics are taken of the unscaled gradients, and ``p.grad`` is
        written scaled, ready for ``grad_scaler.unscale_(optimizer)``.

        ``p.grad`` is replaced, not accumulated into. Parameters no source
        reaches keep their ``.grad``. If anything fails, no ``p.grad`` (and
        no carried state) has changed.
        """
        try:
            return self._backward(losses, grad_scaler)
        finally:
            if self._taps is not None:
                self._taps.clear()
            if self._laplace is not None:
                self._laplace.clear()

    def state_dict(self) -> dict[str, Any]:
        """Carried statistics and the random generator's state (all tensors copied)."""
        return {
            "format": 1,
            "samples": self.samples,
            "params": self.param_names,
            "state": None if self._state is None else self._state.state_dict(),
            "generator": self._generator.get_state().clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the next ``backward`` continues the saved run."""
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != 1:
            raise ConfigError("state_dict: not a GradientCalibrator.state_dict() (format 1)")
        if state_dict.get("samples") != self.samples:
            raise ConfigError(
                f"state_dict: saved with samples={state_dict.get('samples')!r}, this calibrator "
                f"uses {self.samples!r}; build it with the same sample source"
            )
        shapes = {n: tuple(p.shape) for n, p in self._params}
        saved = state_dict.get("state")
        if (saved is None) != (self._state is None):
            raise ConfigError("state_dict: carried statistics do not match this calibrator's rho")
        if self._state is not None:
            self._state.rho = float(saved["rho"])
            self._state.load_state_dict(saved, shapes)
        self._generator.set_state(state_dict["generator"].clone())

    def remove_hooks(self) -> None:
        """Remove the forward hooks (Linear shortcut with ``model=``, Linear Laplace layers)."""
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
        if self._laplace is not None:
            self._laplace.remove()

    # --------------------------------------------------------------- internal
    def _check_losses(self, losses: Mapping[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
        if not isinstance(losses, Mapping) or not losses:
            raise ShapeError(
                "losses: expected a non-empty mapping source name -> per-example loss tensor"
            )
        names, tensors = [], []
        for name, l in losses.items():
            if not isinstance(l, torch.Tensor) or not l.is_floating_point():
                raise ShapeError(f"losses[{name!r}]: expected a floating torch.Tensor, got {type(l).__name__}")
            if l.dim() > 1 or (l.dim() == 0 and self.samples != "steps"):
                raise ShapeError(
                    f"losses[{name!r}]: shape {tuple(l.shape)}; pass the per-example loss vector of "
                    f"shape (batch,) (e.g. reduction='none')"
                    + ("" if l.dim() else ", or use samples='steps' for scalar losses")
                )
            if l.numel() == 0:
                continue
            if not l.requires_grad:
                raise ShapeError(
                    f"losses[{name!r}]: does not require grad; compute it from the model's outputs "
                    f"with autograd enabled (not under torch.no_grad())"
                )
            names.append(str(name))
            tensors.append(l)
        if not names:
            raise ShapeError("losses: every loss vector is empty; pass at least one example")
        if self.source_weights is not None:
            missing = [n for n in names if n not in self.source_weights]
            if missing:
                raise ConfigError(
                    f"source_weights: no weight for source(s) {missing}; give every source a weight"
                )
        return names, tensors

    def _problem(self, names: list[str], tensors: list[torch.Tensor]) -> _samples.Problem:
        cands = self._taps.candidates() if self._taps is not None else []
        node_ids = [id(t.out.grad_fn) for t in cands]
        # FSDP2: the graph reaches the unsharded tensors of sharded parameters.
        index, compute = compute_params(self._params, self._index)
        reaches = [walk(l, index, node_ids) for l in tensors]
        in_graph = set().union(*[r.nodes for r in reaches]) if reaches else set()
        # Records outside the current graph (an earlier forward nobody backpropagated) do
        # not count; a layer called twice within the graph cannot use the shortcut.
        per_mod: dict[int, list] = {}
        for t in cands:
            if id(t.out.grad_fn) in in_graph:
                per_mod.setdefault(id(t.module), []).append(t)
        # Calls that are not candidates (3-D input, ...) are caught by the fan-in check below.
        taps = [ts[0] for ts in per_mod.values() if len(ts) == 1]
        shortcut: list[list] = []
        for k, r in enumerate(reaches):
            mine = []
            for t in taps:
                if id(t.out.grad_fn) not in r.nodes:
                    continue
                idxs = [i for i in (t.weight, t.bias) if i is not None]
                # The weight must reach this loss only through this layer call.
                if any(r.fan_in.get(i, 0) != 1 for i in idxs):
                    continue
                if t.out.shape[0] != tensors[k].shape[0] and (
                    self.samples == "microbatch" or layer_type(t.module) is not nn.Linear
                ):
                    continue
                mine.append(t)
            shortcut.append(mine)
        return _samples.Problem(
            names, tensors, compute, [r.params for r in reaches], shortcut
        )

    def _sample(self, prob: _samples.Problem) -> dict[str, dict[int, GradientStats]]:
        if self.samples == "per_example":
            return _samples.per_example(prob, self.chunk_bytes)
        if self.samples == "microbatch":
            return _samples.microbatch(prob, self.chunks, self.chunk_bytes)
        if self.samples == "laplace":
            return self._laplace.sample(prob, self._generator, self.chunk_bytes, self._group(), self.timeout)
        means = _samples.step_means(prob)
        # One sample per step; the count carries the batch size only for the
        # cross-rank average and is reset to 1 below.
        return {
            s: {i: GradientStats(float(prob.batch(k)), g, torch.zeros_like(g)) for i, g in means[s].items()}
            for k, s in enumerate(prob.names)
        }

    def _group(self):
        return active_group(self.process_group)

    def _backward(self, losses: Mapping[str, torch.Tensor], grad_scaler: Any) -> dict[str, Any]:
        group = self._group()
        prob = None
        if group is None:
            names, tensors = self._check_losses(losses)
        else:  # the same sources on every rank, or the same DistributedError on every rank
            names, tensors, prob = agree(self, losses, group)
        scale = None
        if grad_scaler is not None and getattr(grad_scaler, "is_enabled", lambda: True)():
            # scaler.scale() also initialises the scaler's state for unscale_/step.
            tensors = [grad_scaler.scale(l) for l in tensors]
            scale = float(grad_scaler.get_scale())
        plain_on_nonfinite = self.on_nonfinite == "plain" or scale is not None
        # In a process group a NaN must travel through the all-reduce so that every
        # rank raises (one rank raising alone would leave its peers waiting).
        if not plain_on_nonfinite and group is None:
            for s, l in zip(names, tensors):
                if not bool(torch.isfinite(l.detach()).all()):
                    raise NonFiniteError(
                        f"losses[{s!r}]: contains NaN or infinite values; check the inputs and the "
                        f"loss for overflow, or with AMP pass grad_scaler= (or "
                        f"on_nonfinite='plain') so that the step is skipped"
                    )
        if prob is None:
            prob = self._problem(names, tensors)
        else:
            prob.losses = tensors  # scaled by grad_scaler; the graph walk is unchanged
        if group is None or self.samples == "laplace":  # laplace reduces its own draws
            stats = self._sample(prob)
        else:
            stats = sample_and_reduce(self, prob, group)
        if self.samples == "steps":
            stats = {
                s: {i: GradientStats(1.0, st.mean, torch.zeros_like(st.mean)) for i, st in per.items()}
                for s, per in stats.items()
            }
        if scale is not None:
            stats = {
                s: {i: GradientStats(st.count, st.mean / scale, st.m2 / (scale * scale)) for i, st in per.items()}
                for s, per in stats.items()
            }
        out_scale = 1.0 if scale is None else scale

        # One reduction per tensor and one sync: a NaN or inf anywhere makes the sum non-finite.
        flat = [(s, i, st) for s, per in stats.items() for i, st in per.items()]
        finite = _all_finite([st.mean.sum() + st.m2.sum() for _, _, st in flat])
        bad = [(s, self._params[i][0]) for (s, i, st), ok in zip(flat, finite)
               if not ok and not (bool(torch.isfinite(st.mean).all()) and bool(torch.isfinite(st.m2).all()))]
        if bad:
            if not plain_on_nonfinite:
                s, pname = bad[0]
                raise NonFiniteError(
                    f"losses[{s!r}]: the gradient of parameter {pname!r} contains NaN or infinite "
                    f"values; check the loss for overflow or NaN inputs, lower the learning rate, "
                    f"or with AMP pass grad_scaler= (or on_nonfinite='plain') so the step is skipped"
                )
            grads = self._plain(stats, names, out_scale)
            self._write(grads)
            return {"samples": self.samples, "sources": names, "nonfinite": True,
                    "nonfinite_parameters": sorted({p for _, p in bad}), "warmup": False,
                    "parameters": {}}

        del flat, finite
        # Carried statistics: accumulated count and M2, current mean.
        new_state = None
        used = stats
        if self._state is not None:
            keyed = {(s, self._params[i][0]): st for s, per in stats.items() for i, st in per.items()}
            new_state = self._state.updated(keyed)
            del keyed
            used = {
                s: {i: GradientStats(new_state[(s, self._params[i][0])].count, st.mean,
                                     new_state[(s, self._params[i][0])].m2)
                    for i, st in per.items()}
                for s, per in stats.items()
            }
        del stats
        if self.keep_statistics:
            self.last_statistics = {
                s: {self._params[i][0]: st for i, st in per.items()} for s, per in used.items()
            }
        shortcut = sorted({
            self._params[i][0] for taps in prob.shortcut for t in taps
            for i in (t.weight, t.bias) if i is not None
        })
        del prob
        grads, diag = self._calibrate(used, names, out_scale)
        diag["shortcut_parameters"] = shortcut
        self._write(grads)
        if new_state is not None:
            self._state.commit(new_state)
        return diag

    def _lam(self, s: str) -> float:
        return 1.0 if self.source_weights is None else self.source_weights[s]

    def _plain(self, stats, names, out_scale) -> dict[int, torch.Tensor]:
        grads: dict[int, torch.Tensor] = {}
        for s in names:
            for i, st in stats[s].items():
                g = st.mean * (self._lam(s) * out_scale)
                grads[i] = g if i not in grads else grads[i] + g
        return grads

    def _calibrate(self, used, names, out_scale):
        """Calibrated gradients ``{param index: tensor}`` and the step's diagnostics.

        ``used`` is emptied on the way: each tensor's statistics are released
        as soon as it is calibrated, smallest tensors first, so that the peak
        memory is the statistics of the largest tensors plus one tensor's
        calibration temporaries.
        """
        per_param: dict[int, dict[str, GradientStats]] = {}
        for s in names:
            for i, st in used[s].items():
                per_param.setdefault(i, {})[s] = st
        counts = {s: float(torch.as_tensor(next(iter(used[s].values())).count).max())
                  for s in names if used[s]}
        used.clear()
        order = sorted(per_param, key=lambda i: (self._params[i][1].numel(), i))
        multi = [i for i in order if len(per_param[i]) > 1]
        warmup = False
        if self.config.prior.beta0 is None:
            warmup = any(
                float(torch.as_tensor(st.count).max()) < 2 for i in multi for st in per_param[i].values()
            )
        grads: dict[int, torch.Tensor] = {}
        pdiag: dict[str, Any] = {}
        for i in order:
            srcs = per_param[i]
            if len(srcs) == 1 or warmup:
                g = None
                for s, st in srcs.items():
                    t = st.mean * (self._lam(s) * out_scale)
                    g = t if g is None else g + t
                grads[i] = g
                pdiag[self._params[i][0]] = (
                    {"sources": list(srcs), "single_source": next(iter(srcs))}
                    if len(srcs) == 1 else {"sources": list(srcs), "warmup": True}
                )
                del per_param[i]
        summaries: dict[int, tuple] = {}  # param -> (sources, numel, summary tensor, flags)
        if multi and not warmup:
            lam = self.source_weights
            if self.config.scope == "tensor":
                for i in multi:
                    srcs = per_param.pop(i)
                    # the sources reaching this tensor may be a subset of all sources
                    lam_i = None if lam is None else {k: lam[k] for k in srcs}
                    cal = calibrate(srcs, self.config, lam_i, check_values=False)  # checked above
                    del srcs
                    grads[i] = cal.gradient * out_scale if out_scale != 1.0 else cal.gradient
                    summaries[i] = self._digest(cal)
                    del cal
            else:
                cals = calibrate_tensors(
                    [per_param.pop(i) for i in multi], self.config, lam, check_values=False
                )
                for i, cal in zip(multi, cals):
                    grads[i] = cal.gradient * out_scale if out_scale != 1.0 else cal.gradient
                    summaries[i] = self._digest(cal)
                del cals
        return grads, self._summary(names, pdiag, summaries, counts, warmup, len(multi), len(order))

    def _digest(self, cal) -> tuple:
        """What the diagnostics need from one Calibration, as small tensors (no sync yet)."""
        S = len(cal.sources)
        if self.diagnostics == "none":
            return cal.sources, cal.gradient.numel(), None, dict(cal.flags)
        if self.diagnostics == "full":
            return cal.sources, cal.gradient.numel(), cal.diagnostics, dict(cal.flags)
        row = torch.cat([
            cal.weights.reshape(S, -1).mean(dim=1).double(),
            cal.evidence.reshape(S, -1).mean(dim=1).double(),
            torch.stack([cal.uncertainty.mean(), cal.belief_scale.min(),
                         cal.belief_scale.max()]).double(),
        ])
        return cal.sources, cal.gradient.numel(), row, dict(cal.flags)

    def _summary(self, names, pdiag, summaries, counts, warmup, n_multi, n_reached) -> dict[str, Any]:
        d: dict[str, Any] = {
            "samples": self.samples,
            "sources": list(names),
            "counts": counts,
            "num_reached": n_reached,
            "num_calibrated": 0 if warmup else n_multi,
            "num_single_source": n_reached - n_multi,
            "warmup": bool(warmup),
            "nonfinite": False,
        }
        if summaries and self.diagnostics != "none":
            if self.diagnostics == "summary":
                # One host sync for the whole step.
                rows = torch.cat([r for _, _, r, _ in summaries.values()]).cpu().tolist()
            tot = sum(n for _, n, _, _ in summaries.values())
            wm = {s: 0.0 for s in names}
            em = {s: 0.0 for s in names}
            fu, smin, smax, pos = 0.0, math.inf, -math.inf, 0
            for i, (sources, numel, row, flags) in summaries.items():
                S = len(sources)
                if self.diagnostics == "summary":
                    v = rows[pos:pos + 2 * S + 3]
                    pos += 2 * S + 3
                    entry = {
                        "sources": list(sources),
                        "weight_mean": dict(zip(sources, v[:S])),
                        "evidence_mean": dict(zip(sources, v[S:2 * S])),
                        "fused_uncertainty_mean": v[2 * S],
                        "belief_scale_min": v[2 * S + 1],
                        "belief_scale_max": v[2 * S + 2],
                        "path": str(flags.get("path", "reference")),
                        **({"fallback": str(flags["fallback"])} if "fallback" in flags else {}),
                    }
                else:
                    entry = row
                pdiag[self._params[i][0]] = entry
                frac = numel / tot
                fu += frac * entry["fused_uncertainty_mean"]
                smin = min(smin, entry["belief_scale_min"])
                smax = max(smax, entry["belief_scale_max"])
                for s in sources:
                    wm[s] += frac * entry["weight_mean"][s]
                    em[s] += frac * entry["evidence_mean"][s]
            d["weight_mean"] = wm
            d["evidence_mean"] = em
            d["fused_uncertainty_mean"] = fu
            d["belief_scale_min"] = smin
            d["belief_scale_max"] = smax
        if summaries:
            d["paths"] = sorted({str(f.get("path", "reference")) for _, _, _, f in summaries.values()})
            fb = sorted({str(f["fallback"]) for _, _, _, f in summaries.values() if "fallback" in f})
            if fb:
                d["fallback"] = fb
        d["parameters"] = pdiag if self.diagnostics != "none" else {}
        return d

    def _write(self, grads: dict[int, torch.Tensor]) -> None:
        # Convert everything first, so that nothing is written if a conversion fails.
        # A sharded (FSDP2) parameter gets its own shard of the gradient, as a DTensor.
        ready = [(p, local_grad(p, g.detach().to(dtype=p.dtype, device=p.device)))
                 for p, g in ((self._params[i][1], g) for i, g in grads.items())]
        for p, g in ready:
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
