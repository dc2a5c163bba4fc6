"""``GradientCalibrator``: BOGC in an ordinary PyTorch training loop.

::

    cal = GradientCalibrator(model.named_parameters(), samples=Microbatch(chunks=4))
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

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from bogc_core import CalibrationConfig, GradientStats
from bogc_core.errors import ConfigError, NonFiniteError, ShapeError

from .collective_step import Distributed
from .graph import walk
from .memory import default_chunk_bytes
from .options import (
    Diagnostics,
    check_on_nonfinite,
    check_rho,
    check_source_weights,
    diagnostics_options,
    named_parameters,
    sample_source,
)
from .samples import Moments, Problem, SourceStats, Stats
from .sharded import compute_params, is_sharded, local_grad
from .shortcut import LinearTaps, Tap, broadcast_parent
from .source import SampleContext, SampleSource
from .state import StepState
from .summary import group_entries, model_summary
from .workspace import Group, Workspace

__all__ = ["GradientCalibrator"]


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


# Why a torch.compile'd model is refused (docs/reliability.md): autograd sees a compiled
# region as one node that reaches all of its parameters, so a source would count as
# reaching parameters it does not depend on (zero-gradient samples, a different
# calibration: 0.1 off with backend="aot_eager"), and the default inductor backend's
# backward cannot be batched over samples at all.
_COMPILED = (
    "losses: their graph runs through a torch.compile'd module, which autograd sees as one "
    "node reaching all of its parameters, so which parameters each source reaches cannot be "
    "told (and inductor's backward cannot be batched over gradient samples); calibrate the "
    "uncompiled model (torch.compile only code that no calibrated parameter passes through)"
)


def _sparse_message(name: str) -> str:
    return (
        f"params: parameter {name!r} gets a sparse gradient (nn.Embedding or nn.EmbeddingBag "
        f"with sparse=True), of which no gradient samples can be taken; build the layer with "
        f"sparse=False, or leave {name!r} out of the calibrator's parameters"
    )


def _check_model(model: nn.Module, params: list[tuple[str, torch.Tensor]],
                 index: dict[int, int]) -> None:
    """Refuse at construction what ``model`` shows cannot be sampled: sparse embedding
    gradients of calibrated parameters, and ``torch.compile``'d modules."""
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if (isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.sparse
                and isinstance(w, torch.Tensor) and id(w) in index):
            raise ConfigError(_sparse_message(params[index[id(w)]][0]))
    if any(isinstance(getattr(mod, "_orig_mod", None), nn.Module) for mod in model.modules()):
        raise ConfigError(
            "model: a torch.compile'd module (or one holding one), which autograd sees as one "
            "node reaching all of its parameters, so which parameters each source reaches "
            "cannot be told; pass the uncompiled model and run its forward uncompiled"
        )


def _explain_autograd_failure(exc: BaseException) -> Exception | None:
    """The BOGCError that says why autograd failed on the step's losses, or ``None``."""
    msg = str(exc)
    if "backward through the graph a second time" in msg:
        return ShapeError(
            "losses: their graph was already freed by an earlier backward (loss.backward() "
            "or another calibrator call); call GradientCalibrator.backward(losses) instead "
            "of loss.backward(), or pass retain_graph=True to the earlier backward"
        )
    if "modified by an inplace operation" in msg:
        return ShapeError(
            "losses: a tensor their graph saved was modified in place after the forward pass "
            "(typically optimizer.step() between two backward calls on the same losses); "
            "compute the losses again, with a new forward pass, after every optimizer step"
        )
    return None


class GradientCalibrator:
    """Calibrated multi-source gradients for a set of parameters.

    Parameters
    ----------
    params : iterable of parameters or of ``(name, parameter)`` pairs
        The parameters whose gradients are calibrated (names key the
        diagnostics and the state dict; default ``param0``, ``param1``...).
    config : CalibrationConfig
        Options of ``docs/method.md`` (``scope`` groups tensors, ``fast_path``
        picks the fast path).
    samples : SampleSource or {"microbatch", "per_example", "steps"}
        Where the gradient samples come from (``docs/method.md``, Stage 0),
        with its own options: ``Microbatch(chunks=4)``, ``PerExample()``,
        ``Laplace(layers=..., prior_precision=1.0, draws=8, seed=0)`` or
        ``Steps(rho=0.9)``; each also takes ``rho`` (statistics carried
        across steps with that forgetting factor) and, but ``Steps``,
        ``chunk_bytes``. A name stands for that sample source with its
        default options (``Laplace`` has none: it needs its layers).
    source_weights : mapping source -> float or None
        Fixed ``lambda_k``, applied after calibration.
    model : nn.Module, optional (keyword)
        Enables the per-layer shortcut for its ``nn.Linear`` (inputs of any
        rank), ``nn.Conv2d``, ``nn.Embedding`` and ``nn.LayerNorm`` layers
        (``PerExample`` and ``Microbatch``): forward
        hooks record each layer's input and output, and one backward to the
        layer outputs gives every source's statistics (no backward pass per
        example). It assumes each example's loss depends on its own row of
        the layer's output only (no batch norm or attention across the batch
        after the layer); leave ``model`` out otherwise.
    distributed : Distributed or None (keyword)
        The process group and timeout of the collectives
        (``Distributed(process_group=None, timeout=None)``, the default,
        uses the default group when ``torch.distributed`` is initialised).
    diagnostics : Diagnostics or {"summary", "full", "none"} (keyword)
        What :meth:`backward` reports per calibrated parameter and how often
        (``Diagnostics(level="summary", every=50, keep_statistics=False)``;
        a level stands for the default other options).
    on_nonfinite : {"raise", "plain"} (keyword)
        What to do when a gradient sample is NaN or infinite, or (float32 groups
        on the CPU, whose output the compiled loops check) the calibrated
        gradient overflows: raise :class:`~bogc_core.NonFiniteError`
        (no ``p.grad`` changes), or write the plain summed gradient (with its
        non-finite values, so that a ``GradScaler`` skips the step).
        ``backward(..., grad_scaler=...)`` implies ``"plain"``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        config: CalibrationConfig | None = None,
        samples: SampleSource | str = "microbatch",
        source_weights: Mapping[str, float] | None = None,
        *,
        model: nn.Module | None = None,
        distributed: Distributed | None = None,
        diagnostics: Diagnostics | str = "summary",
        on_nonfinite: str = "raise",
    ) -> None:
        self._params = named_parameters(params)
        # A zero-size parameter (a layer of a 0-feature modality) has no gradient entries:
        # it is left out of the graph walk, the shortcut and the calibration, and its
        # p.grad is left alone.
        self._index = {id(p): i for i, (_, p) in enumerate(self._params) if p.numel() > 0}
        config = CalibrationConfig() if config is None else config
        if not isinstance(config, CalibrationConfig):
            raise ConfigError(f"config: expected CalibrationConfig, got {type(config).__name__}")
        self.config = config
        self.samples = sample_source(samples)
        self.rho = check_rho(self.samples.rho, self.samples.NAME, config,
                             f"{type(self.samples).__name__}(rho=)")
        self.source_weights = check_source_weights(source_weights)
        if distributed is None:
            distributed = Distributed()
        if not isinstance(distributed, Distributed):
            raise ConfigError(
                f"distributed: expected Distributed(process_group=..., timeout=...) or None, "
                f"got {type(distributed).__name__}"
            )
        self.distributed = distributed
        self.diagnostics = diagnostics_options(diagnostics)
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        # The sample source's bound, or one sized from the model (chunk_bytes=None).
        self.chunk_bytes = (self.samples.chunk_bytes if self.samples.chunk_bytes is not None
                            else default_chunk_bytes(p for _, p in self._params))
        self._state = StepState(self.rho) if self.rho is not None else None
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"model: expected an nn.Module, got {type(model).__name__}")
        if model is not None:
            _check_model(model, self._params, self._index)
        self._taps = (
            LinearTaps(model, self._index)
            if model is not None and self.samples.USES_SHORTCUT else None
        )
        self._generator = torch.Generator().manual_seed(int(self.samples.seed))
        self._workspace = Workspace([p for _, p in self._params])
        self._steps_done = 0
        #: source -> parameter name -> GradientStats used by the last backward
        #: (unscaled); filled only with ``Diagnostics(keep_statistics=True)``.
        self.last_statistics: dict[str, dict[str, GradientStats]] = {}

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
        diagnostics on this step or not, whatever ``Diagnostics(every=)`` says
        (``None``: its schedule); ``Diagnostics(level="none")`` never samples.
        """
        try:
            return self._backward(losses, grad_scaler, sample_diagnostics)
        finally:
            if self._taps is not None:
                self._taps.clear()
            self.samples.clear()

    def state_dict(self) -> dict[str, Any]:
        """Carried statistics and the random generator's state (all tensors copied)."""
        return {
            "format": 1,
            "samples": self.samples.NAME,
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
        if state_dict.get("samples") != self.samples.NAME:
            raise ConfigError(
                f"state_dict: saved with samples={state_dict.get('samples')!r}, this calibrator "
                f"uses {self.samples.NAME!r}; build it with the same sample source"
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
            rho = check_rho(saved.get("rho"), self.samples.NAME, self.config, "state_dict['state']['rho']")
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
        self.samples.remove()

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
            if l.dim() > 1 or (l.dim() == 0 and not self.samples.SCALAR_LOSSES):
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
        sparse = sorted(set().union(*[r.sparse for r in reaches]))
        if sparse:
            raise ConfigError(_sparse_message(self._params[sparse[0]][0]))
        if any(r.compiled for r in reaches):
            raise ConfigError(_COMPILED)
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
        ctx = SampleContext(self._generator, self.distributed.group(), self.distributed.timeout,
                            sink, self.chunk_bytes)
        try:
            return self.samples.sample(prob, ctx)
        except RuntimeError as exc:  # NotImplementedError included
            explained = _explain_autograd_failure(exc)
            if explained is not None:
                raise explained from exc
            raise

    def _options(self) -> str:
        """The options every rank of a process group must share, readable."""
        return (f"samples={self.samples!r} source_weights={self.source_weights} "
                f"config={self.config!r}")

    def _losses(self, losses: Mapping[str, torch.Tensor], group: Any,
                grad_scaler: Any) -> tuple[list[str], Problem, float | None]:
        """Step 1: the checked sources, their graph walk and the loss scale (``None``: no
        ``grad_scaler``). In a process group every rank keeps the same sources or raises."""
        if group is None:
            names, tensors = self._check_losses(losses)
            prob = None
        else:
            names, tensors, prob = self.distributed.agree(
                losses, self._check_losses, self._problem, self.param_names, self._options())
        scale = None
        if grad_scaler is not None and getattr(grad_scaler, "is_enabled", lambda: True)():
            # scaler.scale() also initialises the scaler's state for unscale_/step.
            tensors = [grad_scaler.scale(l) for l in tensors]
            scale = float(grad_scaler.get_scale())
        # In a process group a NaN must travel through the all-reduce so that every
        # rank raises (one rank raising alone would leave its peers waiting).
        if self.on_nonfinite == "raise" and scale is None and group is None:
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
        return names, prob, scale

    def _statistics(self, prob: Problem, group: Any, scale: float | None) -> SourceStats:
        """Step 2: the statistics of the (global) batch, of the unscaled gradients."""
        # Carried statistics keep references to this step's tensors: those must not be
        # views of the reused buffers, so the sources write into them only without rho.
        sink = self._workspace.sink if self._state is None else None
        stats: SourceStats
        if group is not None and not self.samples.REDUCES_ITSELF:
            # Every rank joins the all-reduce even when its sampling failed, so that all
            # raise together; the reduced statistics are new tensors (no sink).
            reduced = self.distributed.sample_and_reduce(prob, self._sample)
            stats = {s: {i: st for i, st in per.items()} for s, per in reduced.items()}
        else:
            stats = self._sample(prob, sink)
        stats = self.samples.after_reduce(stats)
        if scale is not None:
            stats = {
                s: {i: Moments(st.count, st.mean / scale, st.m2 / (scale * scale))
                    for i, st in per.items()}
                for s, per in stats.items()
            }
        return stats

    def _carried(self, stats: SourceStats) -> tuple[SourceStats, Any]:
        """Step 3: the statistics to calibrate with carried ones merged in (accumulated count
        and M2, current mean), and the new carried state (``None`` without ``rho``). The merge
        is pure: the state changes only once the step has succeeded."""
        if self._state is None:
            return stats, None
        keyed = {(s, self._params[i][0]): _checked_one(st)
                 for s, per in stats.items() for i, st in per.items()}
        new_state = self._state.updated(keyed)
        used: SourceStats = {
            s: {i: Moments(new_state[(s, self._params[i][0])].count, st.mean,
                           new_state[(s, self._params[i][0])].m2)
                for i, st in per.items()}
            for s, per in stats.items()
        }
        return used, new_state

    def _nonfinite(self, groups: list[Group]) -> list[tuple[str, str]]:
        """Step 4: ``(source, parameter name)`` of every non-finite statistic. One reduction per
        group and one sync: a NaN or inf anywhere makes the sum non-finite."""
        sums = [g.finite_sum() for g in groups]
        finite = _all_finite(sums) if sums else []
        return [(s, self._params[i][0]) for g, ok in zip(groups, finite) if not ok
                for s, i in g.nonfinite_params()]

    def _commit(self, new_state: Any) -> None:
        """Step 6: the carried state first (it can be put back), then ``p.grad``."""
        state = self._state
        if new_state is None or state is None:
            self._write()
            return
        kept = (state.stats, state.steps)
        state.commit(new_state)
        try:
            self._write()
        except BaseException:
            state.stats, state.steps = kept
            raise

    def _backward(self, losses: Mapping[str, torch.Tensor], grad_scaler: Any,
                  sample_diagnostics: bool | None = None) -> dict[str, Any]:
        group = self.distributed.group()
        names, prob, scale = self._losses(losses, group, grad_scaler)
        out_scale = 1.0 if scale is None else scale
        sources_of: dict[int, tuple[str, ...]] = {}
        for k, s in enumerate(names):
            for i in sorted(prob.reach[k]):
                sources_of[i] = sources_of.get(i, ()) + (s,)
        groups = self._workspace.layout(sources_of)
        shortcut = sorted({
            self._params[i][0] for taps in prob.shortcut for t in taps
            for i in (t.weight, t.bias) if i is not None
        })
        stats = self._statistics(prob, group, scale)
        del prob
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
        used, new_state = self._carried(stats)
        del stats
        for g in groups:
            g.fill(used)
        # The groups the compiled loops calibrate check their statistics in the passes that
        # read them anyway; the others are checked here, with one reduction each.
        late = self._checked_in_calibration(groups)
        bad = self._nonfinite([g for g in groups if id(g) not in late])
        if bad:
            return self._nonfinite_step(groups, names, bad, scale, out_scale)
        kept = None
        if self.diagnostics.keep_statistics:
            kept = {
                s: {self._params[i][0]: GradientStats(st.count, st.mean.clone(), st.m2.clone())
                    for i, st in per.items()}
                for s, per in used.items()
            }
        del used
        # Step 5: every group's gradient into its buffer, and the diagnostics.
        try:
            diag = self._calibrate(groups, names, out_scale, sample_diagnostics, late)
        except NonFiniteError:
            if not late:
                raise
            checked = [g for g in groups if id(g) in late]
            bad = self._nonfinite(checked)
            if not bad:  # finite statistics, an overflowing calibrated gradient
                over = [self._params[i][0] for g in checked for i in g.nonfinite_output()]
                if not over:
                    raise
                return self._nonfinite_step(groups, names, [], scale, out_scale, over)
            return self._nonfinite_step(groups, names, bad, scale, out_scale)
        if kept is not None:
            self.last_statistics = kept
        diag["shortcut_parameters"] = shortcut
        self._commit(new_state)
        self._steps_done += 1
        return diag

    def _checked_in_calibration(self, groups: list[Group]) -> set[int]:
        """``id`` of each group whose calibration call checks its values: float32 groups on
        the CPU with one count per source that are calibrated, not stepped plainly, whose
        check the compiled loops fold into their passes. The check of the others is one
        reduction each, before calibrating (where the loops do not run, the call's own
        check would cost more)."""
        if self._warmup(groups):
            return set()
        return {id(g) for g in groups if len(g.sources) > 1 and g.mean.device.type == "cpu"
                and g.mean.dtype == torch.float32 and g.count_buf is None}

    def _warmup(self, groups: list[Group]) -> bool:
        """Whether a group of several sources has fewer than two samples of one (the
        empirical-Bayes prior needs two): then every group takes the plain step."""
        return self.config.prior.beta0 is None and any(
            g.min_count() < 2 for g in groups if len(g.sources) > 1)

    def _nonfinite_step(self, groups: list[Group], names: list[str], bad: list[tuple[str, str]],
                        scale: float | None, out_scale: float,
                        overflow: list[str] | None = None) -> dict[str, Any]:
        """A step with a NaN or infinite statistic (``bad``: source, parameter name) or
        calibrated gradient (``overflow``: parameter names): raise, or (``on_nonfinite=
        "plain"``, or under a grad scaler, which then skips the step) write the plain
        gradient, with the carried state unchanged."""
        if self.on_nonfinite == "raise" and scale is None:
            if bad:
                s, pname = bad[0]
                raise NonFiniteError(
                    f"losses[{s!r}]: the gradient of parameter {pname!r} contains NaN or infinite "
                    f"values; check the loss for overflow or NaN inputs, lower the learning rate, "
                    f"or with AMP pass grad_scaler= (or on_nonfinite='plain') so the step is skipped"
                )
            raise NonFiniteError(
                f"params: the calibrated gradient of {', '.join(map(repr, overflow or []))} "
                f"overflows its dtype; rescale the losses or the source_weights, calibrate in "
                f"float64, or pass on_nonfinite='plain' so that such a step is taken plainly"
            )
        for g in groups:
            g.plain(self.source_weights, out_scale)
        self._write()
        return {"samples": self.samples.NAME, "sources": names, "nonfinite": True,
                "nonfinite_parameters": sorted({p for _, p in bad} | set(overflow or [])),
                "warmup": False, "parameters": {}}

    def _calibrate(self, groups: list[Group], names: list[str], out_scale: float,
                   sample_diagnostics: bool | None = None,
                   checked: Collection[int] = ()) -> dict[str, Any]:
        """Every group's gradient into its ``out`` buffer, and the step's diagnostics; the
        groups in ``checked`` (ids) have their calibration call check their values."""
        multi = [g for g in groups if len(g.sources) > 1]
        warmup = self._warmup(groups)
        level = self.diagnostics.level
        due = (self._steps_done % self.diagnostics.every == 0 if sample_diagnostics is None
               else sample_diagnostics)
        sampled = level != "none" and due
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
            g.calibrate(self.config, lam, out_scale, fl, check=id(g) in checked)
            if fl is not None:
                flags.append(fl)
                entries.update(group_entries(g, pnames, self.config, level))
        n_multi = sum(len(g.params) for g in multi)
        n_reached = sum(len(g.params) for g in groups)
        d: dict[str, Any] = {
            "samples": self.samples.NAME,
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
        d["parameters"] = pdiag if level != "none" else {}
        return d

    def _write(self) -> None:
        """The layout's gradient buffers into ``p.grad`` (after every check of the step passed).

        A parameter without a gradient takes its part of the buffer itself, no copy (like
        the fresh ``p.grad`` of a plain backward; the buffer then belongs to the gradients
        and the next step writes a new one); one of another dtype or device, or a sharded
        (FSDP2) one, gets a converted copy (its shard, as a DTensor); an existing ``p.grad``
        is overwritten in place. Every new gradient is formed first, so that nothing is
        written if one fails."""
        pending = [(g, self._params[i][1], v) for g, i, v in self._workspace.grad_views()]
        fresh: dict[int, torch.Tensor] = {}
        shards: dict[int, torch.Tensor] = {}
        given: dict[int, Group] = {}
        for g, p, v in pending:
            if p.grad is not None:
                shards[id(p)] = local_grad(p, v)
            elif is_sharded(p) or v.dtype != p.dtype or v.device != p.device:
                fresh[id(p)] = local_grad(p, v.detach().to(dtype=p.dtype, device=p.device, copy=True))
            else:
                fresh[id(p)] = v
                given[id(g)] = g
        for _, p, _ in pending:
            if id(p) in fresh:
                p.grad = fresh[id(p)]
            elif p.grad is not None:
                p.grad.copy_(shards[id(p)])
        for g in given.values():
            g.hand_over()
