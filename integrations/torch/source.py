"""The interface every sample source implements (``docs/method.md``, Stage 0).

A sample source turns one step's per-source losses into, per source and per
parameter it reaches, the :class:`~bogc_core.GradientStats` of that source's
gradient samples. :class:`GradientCalibrator` holds one source, calls
:meth:`SampleSource.sample` once per step and handles everything else
(the cross-rank reduction, carried statistics, calibration, writing
``p.grad``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .samples import Problem, SourceStats

__all__ = ["SampleContext", "SampleSource"]


@dataclass
class SampleContext:
    """What a source may use besides the losses: a memory bound, the calibrator's
    random generator, the process group (``None`` in one process) and its timeout.

    ``sink(source, index)``, when given, returns ``(mean, m2)`` views in the
    parameter's shape and working dtype where the source may write those
    statistics directly (and return the views), or ``None``.
    """

    chunk_bytes: int
    generator: torch.Generator
    group: Any = None
    timeout: timedelta | None = None
    sink: Callable[[str, int], tuple[torch.Tensor, torch.Tensor] | None] | None = None


class SampleSource:
    """Base class of the sample sources.

    ``NAME``: the ``samples=`` value that selects it. ``REDUCES_ITSELF``: the
    source all-reduces its own statistics across ranks (otherwise the
    calibrator reduces the sums form of what :meth:`sample` returns).
    ``SCALAR_LOSSES``: scalar losses are accepted (one sample per step).
    ``USES_SHORTCUT``: the per-layer shortcut (``model=``) applies.
    """

    NAME: str = ""
    REDUCES_ITSELF: bool = False
    SCALAR_LOSSES: bool = False
    USES_SHORTCUT: bool = False

    def sample(self, prob: Problem, ctx: SampleContext) -> SourceStats:
        """Per source name and parameter index, the statistics of this step's samples."""
        raise NotImplementedError

    def after_reduce(self, stats: SourceStats) -> SourceStats:
        """Adjust the statistics after the cross-rank reduction (default: as they are)."""
        return stats

    def clear(self) -> None:
        """Forget what was recorded during the step's forward pass."""

    def remove(self) -> None:
        """Remove any hooks the source installed."""
