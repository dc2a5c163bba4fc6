"""``Distributed``: the calibrator's options and steps in a ``torch.distributed`` process group.

:meth:`Distributed.agree` replaces the loss check and graph walk: it runs them
locally (through the callables the calibrator passes), catches a local
failure instead of raising alone, and joins the per-step agreement collective
(:class:`~.distributed.Agreement`), after which every rank either raises the
same :class:`~bogc_core.DistributedError` or goes on with the same sources.
:meth:`Distributed.sample_and_reduce` takes the gradient samples and joins the
statistics all-reduce even when sampling failed locally, so that no rank is
left waiting. Both are only used when a process group is active
(``docs/distributed.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch

from bogc_core import GradientStats
from bogc_core.errors import ConfigError

from .distributed import Agreement, LocalView, active_group, allreduce_stats, stats_layout
from .samples import Problem, SourceStats

__all__ = ["Distributed"]

CheckLosses = Callable[[Mapping[str, torch.Tensor]], tuple[list[str], list[torch.Tensor]]]
MakeProblem = Callable[[list[str], list[torch.Tensor]], Problem]


class Distributed:
    """Where and how long the calibrator's collectives run; owns the per-step agreement.

    ``process_group``: the group to all-reduce statistics over; ``None`` uses
    the default group when ``torch.distributed`` is initialised (and nothing
    in a single process). ``timeout``: wait at most this long for each
    collective; ``None`` uses the process group's timeout.
    """

    def __init__(self, process_group: Any = None, timeout: timedelta | None = None) -> None:
        if timeout is not None and not isinstance(timeout, timedelta):
            raise ConfigError(
                f"Distributed(timeout=): expected a datetime.timedelta or None, got "
                f"{type(timeout).__name__}"
            )
        self.process_group = process_group
        self.timeout = timeout
        self.agreement = Agreement()  # per-step check in a process group (docs/distributed.md)

    def __repr__(self) -> str:
        return f"Distributed(process_group={self.process_group!r}, timeout={self.timeout!r})"

    def group(self) -> Any:
        """The active process group, or ``None`` when running in a single process."""
        return active_group(self.process_group)

    def agree(
        self,
        losses: Mapping[str, torch.Tensor],
        check: CheckLosses,
        problem: MakeProblem,
        param_names: Sequence[str],
        options: str,
    ) -> tuple[list[str], list[torch.Tensor], Problem]:
        """``(names, tensors, problem)`` of the sources every rank keeps this step.

        ``check`` validates the losses and ``problem`` walks their graph (the
        calibrator's); ``options`` is the readable form of the calibrator's
        options, which must agree across ranks. A source whose loss vector is
        empty on any rank sits the step out on every rank; anything else that
        differs between ranks (or fails on one) raises the same error on every rank.
        """
        group = self.group()
        view = LocalView(step=0, names=[], empty=[], options=options)
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
                    names, tensors = check(kept)
                    prob = problem(names, tensors)
            else:
                names, tensors = check(losses)  # raises the usual ShapeError
            if prob is not None:
                view.keys = self.agreement.keys(names, prob.reach, tensors, prob.params)
        except Exception as exc:  # reported to every rank by the agreement collective
            failure = exc
            view.error = f"{type(exc).__name__}: {exc}"

        def details() -> None:  # readable reach, dtypes and shapes, only when ranks disagree
            if prob is None:
                return
            view.reach = {s: [param_names[i] for i in r] for s, r in zip(names, prob.reach)}
            view.tensors = {f"loss {s}": str(t.dtype) for s, t in zip(names, tensors)}
            for i in sorted(set().union(*prob.reach)):
                view.tensors[param_names[i]] = f"{prob.params[i].dtype} {tuple(prob.params[i].shape)}"

        try:
            sit_out = self.agreement.check(view, group, self.timeout, details)
        except Exception as exc:
            if failure is not None:
                raise exc from failure
            raise
        assert prob is not None  # a local failure always makes check() raise
        if sit_out:
            keep = [k for k, s in enumerate(names) if s not in sit_out]
            names = [names[k] for k in keep]
            tensors = [tensors[k] for k in keep]
            prob = Problem(
                names, tensors, prob.params, [prob.reach[k] for k in keep],
                [prob.shortcut[k] for k in keep] if prob.shortcut else [],
            )
        return names, tensors, prob

    def sample_and_reduce(
        self, prob: Problem, sample: Callable[[Problem], SourceStats]
    ) -> dict[str, dict[int, GradientStats]]:
        """The statistics of the global batch from this rank's ``sample(prob)``; every rank
        raises if sampling failed on any rank."""
        group = self.group()
        try:
            stats = {s: {i: st if isinstance(st, GradientStats) else st.checked()
                         for i, st in per.items()}
                     for s, per in sample(prob).items()}
        except Exception as exc:
            layout = stats_layout(dict(zip(prob.names, prob.reach)),
                                  [tuple(p.shape) for p in prob.params])
            allreduce_stats(None, group, self.timeout, layout=layout, failure=exc)
            raise AssertionError("unreachable: allreduce_stats raises for a failed rank") from exc
        return allreduce_stats(stats, group, self.timeout)
