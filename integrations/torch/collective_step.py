"""The two steps of :meth:`GradientCalibrator.backward` that differ in a process group.

:func:`agree` replaces the loss check and graph walk: it runs them locally,
catches a local failure instead of raising alone, and joins the per-step
agreement collective (:class:`~.distributed.Agreement`), after which every
rank either raises the same :class:`~bogc_core.DistributedError` or goes on
with the same sources. :func:`sample_and_reduce` takes the gradient samples
and joins the statistics all-reduce even when sampling failed locally, so that
no rank is left waiting. Both are only used when a process group is active.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from bogc_core import GradientStats

from . import samples as _samples
from .distributed import LocalView, allreduce_stats, stats_layout

if TYPE_CHECKING:
    from .calibrator import GradientCalibrator

__all__ = ["agree", "sample_and_reduce"]


def _options(cal: GradientCalibrator) -> str:
    return (f"samples={cal.samples} chunks={cal.chunks} rho={cal.rho} "
            f"source_weights={cal.source_weights} config={cal.config!r}")


def agree(
    cal: GradientCalibrator, losses: Mapping[str, torch.Tensor], group: Any
) -> tuple[list[str], list[torch.Tensor], _samples.Problem]:
    """``(names, tensors, problem)`` of the sources every rank keeps this step.

    A source whose loss vector is empty on any rank sits the step out on
    every rank; anything else that differs between ranks (or fails on one)
    raises the same error on every rank.
    """
    view = LocalView(step=0, names=[], empty=[], options=_options(cal))
    failure: BaseException | None = None
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    prob = None
    try:
        if isinstance(losses, Mapping):
            view.names = [str(k) for k in losses]
            view.empty = [str(k) for k, v in losses.items()
                          if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == 0]
            kept = {k: v for k, v in losses.items() if str(k) not in view.empty}
            # Every source empty here: the others decide whether anything is left.
            if kept or not view.empty:
                names, tensors = cal._check_losses(kept)
                prob = cal._problem(names, tensors)
        else:
            names, tensors = cal._check_losses(losses)  # raises the usual ShapeError
        if prob is not None:
            view.keys = cal._agreement.keys(names, prob.reach, tensors, prob.params)
    except Exception as exc:  # reported to every rank by the agreement collective
        failure = exc
        view.error = f"{type(exc).__name__}: {exc}"

    def details() -> None:  # readable reach, dtypes and shapes, only when ranks disagree
        if prob is None:
            return
        pnames = cal.param_names
        view.reach = {s: [pnames[i] for i in r] for s, r in zip(names, prob.reach)}
        view.tensors = {f"loss {s}": str(t.dtype) for s, t in zip(names, tensors)}
        for i in sorted(set().union(*prob.reach)):
            view.tensors[pnames[i]] = f"{prob.params[i].dtype} {tuple(prob.params[i].shape)}"

    try:
        sit_out = cal._agreement.check(view, group, cal.timeout, details)
    except Exception as exc:
        if failure is not None:
            raise exc from failure
        raise
    assert prob is not None  # a local failure always makes check() raise
    if sit_out:
        keep = [k for k, s in enumerate(names) if s not in sit_out]
        names = [names[k] for k in keep]
        tensors = [tensors[k] for k in keep]
        prob = _samples.Problem(
            names, tensors, prob.params, [prob.reach[k] for k in keep],
            [prob.shortcut[k] for k in keep] if prob.shortcut else [],
        )
    return names, tensors, prob


def sample_and_reduce(
    cal: GradientCalibrator, prob: _samples.Problem, group: Any
) -> dict[str, dict[int, GradientStats]]:
    """The statistics of the global batch; every rank raises if sampling failed on any rank."""
    try:
        stats = {s: {i: st if isinstance(st, GradientStats) else st.checked() for i, st in per.items()}
                 for s, per in cal._sample(prob).items()}
    except Exception as exc:
        layout = stats_layout(dict(zip(prob.names, prob.reach)), [tuple(p.shape) for p in prob.params])
        allreduce_stats(None, group, cal.timeout, layout=layout, failure=exc)
        raise AssertionError("unreachable: allreduce_stats raises for a failed rank") from exc
    return allreduce_stats(stats, group, cal.timeout)
