"""One gradient sample per step: each source's gradient of its mean loss.

The statistics that make a posterior come from the steps themselves: the
calibrator carries them across steps with forgetting factor ``rho``
(:mod:`.state`). Each step's sample is the gradient of ``loss.mean()`` (a
scalar loss as it is), all sources in one batched backward.
"""

from __future__ import annotations

from typing import Any

import torch

from bogc_core.errors import ConfigError

from .samples import Moments, Problem, SourceStats, batched_grads, work_dtype
from .source import SampleContext, SampleSource, check_unit_rho

__all__ = ["Steps", "step_means"]


def step_means(prob: Problem) -> dict[str, dict[int, torch.Tensor]]:
    """Each source's gradient of its mean loss (a scalar loss as is), in one backward."""
    S = len(prob.names)
    inputs = sorted(set().union(*prob.reach))
    if not inputs:
        # No loss reaches a calibrated parameter: nothing to sample (and nothing to write).
        return {s: {} for s in prob.names}
    cots = []
    for k in range(S):
        l = prob.losses[k]
        c = torch.zeros((S,) + tuple(l.shape), dtype=l.dtype, device=l.device)
        c[k] = 1.0 / prob.batch(k) if l.dim() else 1.0
        cots.append(c)
    grads = batched_grads(prob.losses, cots, [prob.params[i] for i in inputs])
    pos = {i: q for q, i in enumerate(inputs)}
    return {
        prob.names[k]: {i: grads[pos[i]][k].to(work_dtype(prob.params[i])) for i in sorted(prob.reach[k])}
        for k in range(S)
    }


class Steps(SampleSource):
    """One sample per source and step, carried with ``rho`` (shorthand ``samples="steps"``).

    ``rho``: forgetting factor in [0, 1] (default 0.9); unless the prior fixes
    the variance scale the calibrator requires ``rho > 0.5`` (at least two
    effective steps).
    """

    NAME = "steps"
    SCALAR_LOSSES = True

    def __init__(self, rho: float = 0.9) -> None:
        if rho is None:
            raise ConfigError(
                "Steps(rho=): the statistics come from carrying steps, so rho cannot be None; "
                "give a forgetting factor in (0.5, 1] (0.9 is the default)"
            )
        super().__init__(check_unit_rho(rho, "Steps(rho=)"))

    def options(self) -> dict[str, Any]:
        return {"rho": self.rho}

    def sample(self, prob: Problem, ctx: SampleContext) -> SourceStats:
        means = step_means(prob)
        # The count carries the batch size only for the cross-rank average of the
        # means; after_reduce resets it to one sample.
        return {
            s: {i: Moments(float(prob.batch(k)), g, torch.zeros_like(g)) for i, g in means[s].items()}
            for k, s in enumerate(prob.names)
        }

    def after_reduce(self, stats: SourceStats) -> SourceStats:
        return {
            s: {i: Moments(1.0, st.mean, torch.zeros_like(st.mean)) for i, st in per.items()}
            for s, per in stats.items()
        }
