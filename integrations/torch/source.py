"""The interface every sample source implements (``docs/method.md``, Stage 0).

A sample source turns one step's per-source losses into, per source and per
parameter it reaches, the :class:`~bogc_core.GradientStats` of that source's
gradient samples. It is an object that carries its own options
(``Microbatch(chunks=4)``, ``Laplace(layers=...)``...), each checked when the
object is built. :class:`GradientCalibrator` holds one sample source, calls
:meth:`SampleSource.sample` once per step and handles everything else (the
cross-rank reduction, carried statistics, calibration, writing ``p.grad``).

Options every sample source has:

- ``rho``: forgetting factor in [0, 1] of the statistics carried across steps
  (``None``: no carrying; :class:`~.steps.Steps` carries with 0.9 by default);
- ``chunk_bytes``: memory bound of one batch of gradient rows (``None``, the
  default: sized from the calibrated parameters and the memory free on their
  device, :func:`~.memory.default_chunk_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from bogc_core.errors import ConfigError

from .samples import Problem, SourceStats

__all__ = ["CHUNK_BYTES", "SampleContext", "SampleSource", "check_chunk_bytes", "check_unit_rho"]

#: Memory bound of one batch of gradient rows when nothing else sets one.
CHUNK_BYTES = 1 << 26


def check_unit_rho(rho: Any, what: str = "rho") -> float | None:
    """``rho`` as a float in [0, 1] (``None`` stays ``None``)."""
    if rho is None:
        return None
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise ConfigError(f"{what}: must be a number in [0, 1] or None, got {type(rho).__name__}")
    if not 0.0 <= float(rho) <= 1.0:
        raise ConfigError(f"{what}: must lie in [0, 1] (1 keeps every step), got {float(rho)}")
    return float(rho)


def check_chunk_bytes(chunk_bytes: Any) -> int | None:
    if chunk_bytes is None:
        return None
    if not (isinstance(chunk_bytes, int) and not isinstance(chunk_bytes, bool) and chunk_bytes > 0):
        raise ConfigError(
            f"chunk_bytes: must be a positive int (bytes of one batch of gradient rows) or None "
            f"(sized from the model), got {chunk_bytes!r}"
        )
    return chunk_bytes


@dataclass
class SampleContext:
    """What a source may use besides the losses: the calibrator's random generator,
    the process group (``None`` in one process) and its timeout.

    ``sink(source, index)``, when given, returns ``(mean, m2)`` views in the
    parameter's shape and working dtype where the source may write those
    statistics directly (and return the views), or ``None``.
    ``chunk_bytes``: the calibrator's memory bound of one batch of gradient
    rows, used when the source's own ``chunk_bytes`` is ``None``.
    """

    generator: torch.Generator
    group: Any = None
    timeout: timedelta | None = None
    sink: Callable[[str, int], tuple[torch.Tensor, torch.Tensor] | None] | None = None
    chunk_bytes: int = CHUNK_BYTES


class SampleSource:
    """Base class of the sample sources.

    ``NAME``: the ``samples=`` shorthand that selects it with its default
    options. ``REDUCES_ITSELF``: the source all-reduces its own statistics
    across ranks (otherwise the calibrator reduces the sums form of what
    :meth:`sample` returns). ``SCALAR_LOSSES``: scalar losses are accepted
    (one sample per step). ``USES_SHORTCUT``: the per-layer shortcut
    (``model=``) applies. ``seed``: seed of the calibrator's random generator.
    """

    NAME: str = ""
    REDUCES_ITSELF: bool = False
    SCALAR_LOSSES: bool = False
    USES_SHORTCUT: bool = False

    def __init__(self, rho: float | None = None, chunk_bytes: int | None = None) -> None:
        self.rho = check_unit_rho(rho)
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.seed = 0

    def options(self) -> dict[str, Any]:
        """The options as plain values (equal on every rank that built the same source)."""
        return {"rho": self.rho, "chunk_bytes": self.chunk_bytes}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def bound(self, ctx: SampleContext) -> int:
        """The memory bound of this step: the source's ``chunk_bytes``, or the context's."""
        return self.chunk_bytes if self.chunk_bytes is not None else ctx.chunk_bytes

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
