"""``GradientCalibrator``: BOGC in an ordinary PyTorch training loop.

::

    cal = GradientCalibrator(model.named_parameters(), samples="microbatch")
    losses = {"audio": ce(out_a, y), "video": ce(out_v, y), "fusion": ce(out, y)}  # (batch,) each
    cal.backward(losses)          # instead of sum(l.mean() for l in losses).backward()
    optimizer.step()

For each source ``k`` and each parameter it reaches, a sample source
(:mod:`.per_example`, :mod:`.microbatch`, :mod:`.laplace`, :mod:`.steps`)
gives ``GradientStats`` (``docs/method.md``, Stage 0). Parameters reached by
the same sources form a group whose statistics sit in flat buffers
(:mod:`.workspace`); each group reached by two or more sources is calibrated
by one :func:`bogc_core.calibrate_gradient` call (Stages 1-5; one segment per
tensor with ``scope="tensor"``), and ``p.grad`` is set to ``g_hat``. With
equal evidence everywhere ``g_hat = sum_k lambda_k * grad(loss_k.mean())``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from bogc_core import CalibrationConfig, GradientStats
from bogc_core.errors import ConfigError, NonFiniteError, ShapeError

from .collective_step import agree, sample_and_reduce
from .distributed import Agreement, active_group
from .graph import walk
from .memory import default_chunk_bytes
from .microbatch import Microbatch
from .options import SAMPLES, check_rho, named_parameters, validate_options
from .per_example import PerExample
from .samples import Moments, Problem, SourceStats, Stats
from .sharded import compute_params, local_grad
from .shortcut import LinearTaps, Tap, broadcast_parent
from .source import SampleContext, SampleSource
from .state import StepState
from .steps import Steps
from .summary import group_entries, model_summary
from .workspace import Group, Workspace

__all__ = ["GradientCalibrator", "SAMPLES"]


def _checked_one(st: Stats) -> GradientStats:
    return st if isinstance(st, GradientStats) else st.checked()


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
        Options of ``docs/method.md`` (``scope`` groups tensors, ``backend``
        picks the fast path).
    samples : {"microbatch", "per_example", "laplace", "steps"}
        Where the gradient samples come from (``docs/method.md``, Stage 0).
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
    chunk_bytes : int or None (keyword)
        Memory bound of one batch of per-example gradient rows. ``None``: sized
        from the parameters and the memory free on their device
        (:func:`~.memory.default_chunk_bytes`: 16 rows of the whole model when
        they fit in an eighth of the free memory, at least 64 MiB).
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
        What :meth:`backward` reports per calibrated parameter on a sampled
        step: ``"summary"`` (mean weight and evidence per source, fused
        uncertainty, belief-scale range), ``"full"`` (the core's complete
        :func:`bogc_core.diagnostics.summarize`), or ``"none"`` (counts and
        flags only, no per-parameter entries, never a sampled step).
    diagnostics_every : int (keyword)
        Sample the diagnostics on the first step and every this many steps
        after it (default 50; 1: every step). A sampled step recomputes each
        calibrated tensor's full calibration for its summary; the other steps
        report counts and flags only and cost no extra pass over the
        statistics.
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
        chunk_bytes: int | None = None,
        seed: int = 0,
        timeout: timedelta | None = None,
        on_nonfinite: str = "raise",
        diagnostics: str = "summary",
        diagnostics_every: int = 50,
        keep_statistics: bool = False,
    ) -> None:
        self._params = named_parameters(params)
        # A zero-size parameter (a layer of a 0-feature modality) has no gradient entries:
        # it is left out of the graph walk, the shortcut and the calibration, and its
        # p.grad is left alone.
        self._index = {id(p): i for i, (_, p) in enumerate(self._params) if p.numel() > 0}
        opts = validate_options(
            config, samples, chunks, rho, source_weights, on_nonfinite=on_nonfinite,
            diagnostics=diagnostics, diagnostics_every=diagnostics_every, chunk_bytes=chunk_bytes,
            timeout=timeout, keep_statistics=keep_statistics,
        )
        self.options = opts
        self.config = opts.config
        self.samples = opts.samples
        self.chunks = opts.chunks
        self.rho = opts.rho
        self.source_weights = opts.source_weights
        self.on_nonfinite = opts.on_nonfinite
        self.diagnostics = opts.diagnostics
        self.diagnostics_every = opts.diagnostics_every
        self.keep_statistics = opts.keep_statistics
        self.chunk_bytes = (opts.chunk_bytes if opts.chunk_bytes is not None
                            else default_chunk_bytes(p for _, p in self._params))
        self.timeout = opts.timeout
        self.process_group = process_group
        self._agreement = Agreement()  # per-step check in a process group (docs/distributed.md)
        self._state = StepState(self.rho) if self.rho is not None else None
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"model: expected an nn.Module, got {type(model).__name__}")
        if laplace_layers is not None and self.samples != "laplace":
            raise ConfigError("laplace_layers: only used with samples='laplace'")
        self._source = self._make_source(laplace_layers, prior_precision, draws)
        self._taps = (
            LinearTaps(model, self._index)
            if model is not None and self._source.USES_SHORTCUT else None
        )
        self._generator = torch.Generator().manual_seed(int(seed))
        self._workspace = Workspace([p for _, p in self._params])
        self._steps_done = 0
        #: source -> parameter name -> GradientStats used by the last backward
        #: (unscaled); filled only with keep_statistics=True.
        self.last_statistics: dict[str, dict[str, GradientStats]] = {}

    def _make_source(self, laplace_layers: Mapping[str, nn.Module] | None, prior_precision: float,
                     draws: int) -> SampleSource:
        if self.samples == "per_example":
            return PerExample()
        if self.samples == "microbatch":
            return Microbatch(self.chunks)
        if self.samples == "steps":
            return Steps()
        from .laplace import LaplaceSource

        return LaplaceSource(laplace_layers, self._index, prior_precision=prior_precision, draws=draws)

    # ----------------------------------------------------------------- public
    @property
    def param_names(self) -> list[str]:
        return [n for n, _ in self._params]

    def backward(self, losses: Mapping[str, torch.Tensor], grad_scaler: Any = None, *,
                 sample_diagnostics: bool | None = None) -> dict[str, Any]:
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

        ``sample_diagnostics``: ``True`` or ``False`` samples the full
        diagnostics on this step or not, whatever ``diagnostics_every`` says
        (``None``: its schedule); ``diagnostics="none"`` never samples.
        """
        try:
            return self._backward(losses, grad_scaler, sample_diagnostics)
        finally:
            if self._taps is not None:
                self._taps.clear()
            self._source.clear()

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
        """Restore :meth:`state_dict` output; the next ``backward`` continues the saved run.

        Everything is checked first (format, sample source, parameter names and
        shapes, ``rho``, counts >= 0, finite moments, the generator state);
        only then is anything replaced, so a failed load changes nothing.
        """
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
        gen_state = state_dict.get("generator")
        if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8:
            raise ConfigError(
                "state_dict['generator']: expected the ByteTensor of torch.Generator.get_state(); "
                "pass the dict saved by GradientCalibrator.state_dict()"
            )
        probe = torch.Generator()
        try:
            probe.set_state(gen_state.clone())
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"state_dict['generator']: not a valid generator state ({exc}); pass the dict "
                f"saved by GradientCalibrator.state_dict()"
            ) from exc
        new_state = None
        if self._state is not None:
            if not isinstance(saved, Mapping):
                raise ConfigError("state_dict['state']: expected a mapping; pass the saved dict as is")
            rho = check_rho(saved.get("rho"), self.samples, self.config, "state_dict['state']['rho']")
            new_state = StepState(float(rho) if rho is not None else 0.0)
            new_state.load_state_dict(saved, shapes)
        # Everything checked: commit.
        if new_state is not None:
            self._state = new_state
            self.rho = new_state.rho
        self._generator.set_state(gen_state.clone())

    def remove_hooks(self) -> None:
        """Remove the forward hooks (Linear shortcut with ``model=``, Linear Laplace layers)."""
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
        self._source.remove()

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
            if l.dim() > 1 or (l.dim() == 0 and not self._source.SCALAR_LOSSES):
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

    def _problem(self, names: list[str], tensors: list[torch.Tensor]) -> Problem:
        cands = self._taps.candidates() if self._taps is not None else []
        node_ids = [id(t.out.grad_fn) for t in cands]
        # FSDP2: the graph reaches the unsharded tensors of sharded parameters.
        index, compute = compute_params(self._params, self._index)
        reaches = [walk(l, index, node_ids) for l in tensors]
        for name, r in zip(names, reaches):
            if r.opaque:
                raise ConfigError(
                    f"losses[{name!r}]: its graph passes through {r.opaque} reentrant gradient "
                    f"checkpoint(s), whose parameters only autograd's own backward can reach, so "
                    f"they would get no calibrated gradient; use non-reentrant checkpointing: "
                    f"gradient_checkpointing_kwargs={{'use_reentrant': False}} (Hugging Face), or "
                    f"torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
                )
        in_graph = set().union(*[r.nodes for r in reaches]) if reaches else set()
        # Records outside the current graph (an earlier forward nobody backpropagated) do
        # not count; a layer called twice within the graph cannot use the shortcut.
        per_mod: dict[int, list[Tap]] = {}
        for t in cands:
            if id(t.out.grad_fn) in in_graph:
                per_mod.setdefault(id(t.module), []).append(t)
        # Calls that are not candidates (3-D input, ...) are caught by the fan-in check below.
        taps = [ts[0] for ts in per_mod.values() if len(ts) == 1]
        shortcut: list[list[Tap]] = []
        for k, r in enumerate(reaches):
            mine = []
            for t in taps:
                if id(t.out.grad_fn) not in r.nodes:
                    continue
                idxs = [i for i in (t.weight, t.bias) if i is not None]
                # The weight must reach this loss only through this layer call.
                if any(r.fan_in.get(i, 0) != 1 for i in idxs):
                    continue
                # The formulas sum over each example's own rows (dim 0 is the batch).
                if t.out.shape[0] != tensors[k].shape[0]:
                    via = broadcast_parent(t, r.parents.get(id(t.out.grad_fn), []),
                                           int(tensors[k].shape[0]))
                    if via is None or (t.via is not None and t.via is not via):
                        continue
                    t.via = via
                mine.append(t)
            shortcut.append(mine)
        return Problem(names, tensors, compute, [r.params for r in reaches], shortcut)

    def _sample(self, prob: Problem, sink: Any = None) -> SourceStats:
        """This rank's statistics from the sample source (``sink``: see :class:`SampleContext`)."""
        ctx = SampleContext(self.chunk_bytes, self._generator, active_group(self.process_group),
                            self.timeout, sink)
        try:
            return self._source.sample(prob, ctx)
        except RuntimeError as exc:
            if "backward through the graph a second time" in str(exc):
                raise ShapeError(
                    "losses: their graph was already freed by an earlier backward (loss.backward() "
                    "or another calibrator call); call GradientCalibrator.backward(losses) instead "
                    "of loss.backward(), or pass retain_graph=True to the earlier backward"
                ) from exc
            raise

    def _backward(self, losses: Mapping[str, torch.Tensor], grad_scaler: Any,
                  sample_diagnostics: bool | None = None) -> dict[str, Any]:
        group = active_group(self.process_group)
        prob: Problem | None = None
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
        sources_of: dict[int, tuple[str, ...]] = {}
        for k, s in enumerate(names):
            for i in sorted(prob.reach[k]):
                sources_of[i] = sources_of.get(i, ()) + (s,)
        groups = self._workspace.layout(sources_of)
        # Carried statistics keep references to this step's tensors: those must not be
        # views of the reused buffers, so the sources write into them only without rho.
        sink = self._workspace.sink if self._state is None else None
        reduce_here = group is not None and not self._source.REDUCES_ITSELF
        stats: SourceStats
        if reduce_here:
            # Every rank joins the all-reduce even when its sampling failed, so that all
            # raise together; the reduced statistics are new tensors (no sink).
            reduced = sample_and_reduce(self, prob, group)
            stats = {s: {i: st for i, st in per.items()} for s, per in reduced.items()}
        else:
            stats = self._sample(prob, sink)
        shortcut = sorted({
            self._params[i][0] for taps in prob.shortcut for t in taps
            for i in (t.weight, t.bias) if i is not None
        })
        del prob
        stats = self._source.after_reduce(stats)
        if scale is not None:
            stats = {
                s: {i: Moments(st.count, st.mean / scale, st.m2 / (scale * scale)) for i, st in per.items()}
                for s, per in stats.items()
            }
        out_scale = 1.0 if scale is None else scale
        produced: dict[int, tuple[str, ...]] = {}
        for s in names:
            for i in stats.get(s, {}):
                produced[i] = produced.get(i, ()) + (s,)
        if produced != sources_of:  # a source covered other parameters than the graph walk found
            missing = [(s, self._params[i][0]) for i, ss in sources_of.items() for s in ss
                       if s not in produced.get(i, ())]
            if missing:
                s, pname = missing[0]
                raise ShapeError(
                    f"losses[{s!r}]: reaches parameter {pname!r} (and {len(missing) - 1} more "
                    f"pairs) but the {self.samples!r} sample source gave no statistics for it, so "
                    f"it would get no calibrated gradient; freeze it (requires_grad=False), leave "
                    f"it out of params, or use another sample source"
                )
            groups = self._workspace.layout(produced)

        # Carried statistics: accumulated count and M2, current mean (the merge is pure;
        # the state changes only once the step has succeeded).
        new_state = None
        used = stats
        if self._state is not None:
            keyed = {(s, self._params[i][0]): _checked_one(st) for s, per in stats.items() for i, st in per.items()}
            new_state = self._state.updated(keyed)
            del keyed
            used = {
                s: {i: Moments(new_state[(s, self._params[i][0])].count, st.mean,
                                     new_state[(s, self._params[i][0])].m2)
                    for i, st in per.items()}
                for s, per in stats.items()
            }
        for g in groups:
            g.fill(used)
        # One reduction per group and one sync: a NaN or inf anywhere makes the sum non-finite.
        sums = [g.finite_sum() for g in groups]
        finite = _all_finite(sums) if sums else []
        bad = [(s, self._params[i][0]) for g, ok in zip(groups, finite) if not ok
               for s, i in g.nonfinite_params()]
        if bad:
            if not plain_on_nonfinite:
                s, pname = bad[0]
                raise NonFiniteError(
                    f"losses[{s!r}]: the gradient of parameter {pname!r} contains NaN or infinite "
                    f"values; check the loss for overflow or NaN inputs, lower the learning rate, "
                    f"or with AMP pass grad_scaler= (or on_nonfinite='plain') so the step is skipped"
                )
            for g in groups:
                g.plain(self.source_weights, out_scale)
            self._write()
            return {"samples": self.samples, "sources": names, "nonfinite": True,
                    "nonfinite_parameters": sorted({p for _, p in bad}), "warmup": False,
                    "parameters": {}}
        if self.keep_statistics:
            self.last_statistics = {
                s: {self._params[i][0]: GradientStats(st.count, st.mean.clone(), st.m2.clone())
                    for i, st in per.items()}
                for s, per in used.items()
            }
        del stats, used
        diag = self._calibrate(groups, names, out_scale, sample_diagnostics)
        diag["shortcut_parameters"] = shortcut
        # Commit: the carried state first (it can be put back), then p.grad.
        state = self._state
        if new_state is not None and state is not None:
            kept = (state.stats, state.steps)
            state.commit(new_state)
            try:
                self._write()
            except BaseException:
                state.stats, state.steps = kept
                raise
        else:
            self._write()
        self._steps_done += 1
        return diag

    def _calibrate(self, groups: list[Group], names: list[str], out_scale: float,
                   sample_diagnostics: bool | None = None) -> dict[str, Any]:
        """Every group's gradient into its ``out`` buffer, and the step's diagnostics."""
        multi = [g for g in groups if len(g.sources) > 1]
        warmup = self.config.prior.beta0 is None and any(g.min_count() < 2 for g in multi)
        due = (self._steps_done % self.diagnostics_every == 0 if sample_diagnostics is None
               else sample_diagnostics)
        sampled = self.diagnostics != "none" and due
        lam = self.source_weights
        counts: dict[str, float] = {}
        for g in groups:
            for s, c in zip(g.sources, g.counts):
                counts[s] = max(counts.get(s, c), c)
        pdiag: dict[str, Any] = {}
        entries: dict[str, dict[str, Any]] = {}
        flags: list[dict[str, Any]] = []
        for g in groups:
            pnames = [self._params[i][0] for i in g.params]
            if len(g.sources) == 1 or warmup:
                g.plain(lam, out_scale)
                if sampled:
                    for n in pnames:
                        pdiag[n] = ({"sources": list(g.sources), "single_source": g.sources[0]}
                                    if len(g.sources) == 1 else {"sources": list(g.sources), "warmup": True})
                continue
            fl: dict[str, Any] | None = {} if sampled else None
            g.calibrate(self.config, lam, out_scale, fl)
            if fl is not None:
                flags.append(fl)
                shapes = [self._params[i][1].shape for i in g.params]
                entries.update(group_entries(g, pnames, shapes, self.config, lam, self.diagnostics))
        n_multi = sum(len(g.params) for g in multi)
        n_reached = sum(len(g.params) for g in groups)
        d: dict[str, Any] = {
            "samples": self.samples,
            "sources": list(names),
            "counts": counts,
            "num_reached": n_reached,
            "num_calibrated": 0 if warmup else n_multi,
            "num_single_source": n_reached - n_multi,
            "warmup": bool(warmup),
            "nonfinite": False,
            "sampled": bool(sampled),
        }
        if entries:
            numels = {self._params[i][0]: self._params[i][1].numel() for g in multi for i in g.params}
            d.update(model_summary(entries, numels, names))
            pdiag.update(entries)
            d["paths"] = sorted({str(f.get("path", "reference")) for f in flags})
            fb = sorted({str(f["fallback"]) for f in flags if "fallback" in f})
            if fb:
                d["fallback"] = fb
            zv = sorted({s for f in flags for s in f.get("zero_variance_sources", [])})
            d["zero_variance_sources"] = zv
        d["parameters"] = pdiag if self.diagnostics != "none" else {}
        return d

    def _write(self) -> None:
        """Copy the layout's gradient buffers into ``p.grad`` (after every check of the step passed)."""
        pending = [(self._params[i][1], v) for i, v in self._workspace.grad_views()]
        # Form every new gradient first, so that nothing is written if one fails. A sharded
        # (FSDP2) parameter gets its own shard of the gradient, as a DTensor.
        fresh = {id(p): local_grad(p, v.detach().to(dtype=p.dtype, device=p.device, copy=True))
                 for p, v in pending if p.grad is None}
        shards = {id(p): local_grad(p, v) for p, v in pending if p.grad is not None}
        for p, _ in pending:
            if id(p) in fresh:
                p.grad = fresh[id(p)]
            elif p.grad is not None:
                p.grad.copy_(shards[id(p)])
