"""Validation of the :class:`GradientCalibrator` options that are not objects of their own.

The sample sources (:mod:`.source`) and :class:`~.collective_step.Distributed`
check their options when built; the constructor and
:meth:`GradientCalibrator.load_state_dict` check the rest here, so that one
bad value gives one message whichever way it arrived.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from bogc_core import CalibrationConfig
from bogc_core.errors import ConfigError

from .microbatch import Microbatch
from .per_example import PerExample
from .source import SampleSource, check_unit_rho
from .steps import Steps

__all__ = [
    "SAMPLES",
    "Diagnostics",
    "DiagnosticsLevel",
    "check_on_nonfinite",
    "check_rho",
    "check_source_weights",
    "diagnostics_options",
    "named_parameters",
    "sample_source",
]

DiagnosticsLevel = Literal["summary", "full", "none"]
#: The ``samples=`` shorthands: each names a sample source with its default options.
SAMPLES: tuple[str, ...] = ("per_example", "microbatch", "laplace", "steps")


@dataclass(frozen=True)
class Diagnostics:
    """What :meth:`GradientCalibrator.backward` reports (shorthand: the level as a string).

    ``level``: ``"summary"`` (mean weight and evidence per source, fused
    uncertainty, belief-scale range per calibrated parameter), ``"full"`` (the
    core's complete ``Calibration.diagnostics``) or ``"none"`` (counts and
    flags only, never a sampled step). ``every``: sample the per-parameter
    entries on the first step and every this many steps after it (1: every
    step); the other steps cost no extra pass over the statistics.
    ``keep_statistics``: keep the last step's statistics in
    ``GradientCalibrator.last_statistics`` (``2 S`` parameter copies between steps).
    """

    level: str = "summary"
    every: int = 50
    keep_statistics: bool = False

    def __post_init__(self) -> None:
        if self.level not in ("summary", "full", "none"):
            raise ConfigError(
                f"Diagnostics(level=): must be 'summary', 'full' or 'none', got {self.level!r}"
            )
        if not (isinstance(self.every, int) and not isinstance(self.every, bool) and self.every >= 1):
            raise ConfigError(
                f"Diagnostics(every=): must be an int >= 1 (1: every step), got {self.every!r}"
            )
        if not isinstance(self.keep_statistics, bool):
            raise ConfigError(f"Diagnostics(keep_statistics=): expected True or False, got "
                              f"{type(self.keep_statistics).__name__}")


def diagnostics_options(diagnostics: Any) -> Diagnostics:
    """A :class:`Diagnostics`, or its level as a string for the default other options."""
    if isinstance(diagnostics, Diagnostics):
        return diagnostics
    if isinstance(diagnostics, str):
        return Diagnostics(level=diagnostics)
    raise ConfigError(
        f"diagnostics: expected Diagnostics(...) or one of 'summary', 'full', 'none', got "
        f"{type(diagnostics).__name__}"
    )


def sample_source(samples: Any) -> SampleSource:
    """The sample source object; a name of :data:`SAMPLES` stands for its default options."""
    if isinstance(samples, SampleSource):
        return samples
    if samples == "laplace":
        raise ConfigError(
            "samples: 'laplace' needs the last layer of each source's modality; pass "
            "samples=Laplace(layers={'audio': model.audio_head, ...})"
        )
    if samples == "per_example":
        return PerExample()
    if samples == "microbatch":
        return Microbatch()
    if samples == "steps":
        return Steps()
    raise ConfigError(
        f"samples: expected a sample source (Microbatch(), PerExample(), Laplace(layers=...), "
        f"Steps()) or one of {SAMPLES}, got {samples!r}"
    )


def check_on_nonfinite(on_nonfinite: Any) -> str:
    if on_nonfinite not in ("raise", "plain"):
        raise ConfigError(f"on_nonfinite: must be 'raise' or 'plain', got {on_nonfinite!r}")
    return str(on_nonfinite)


def check_rho(rho: Any, samples: str, config: CalibrationConfig, what: str = "rho") -> float | None:
    """``rho`` as a float in [0, 1] (``None`` stays ``None``); the ``steps`` sample source needs
    rho > 0.5 unless the prior fixes the variance scale."""
    rho = check_unit_rho(rho, what)
    if rho is None:
        return None
    if samples == "steps" and config.prior.beta0 is None and rho <= 0.5:
        raise ConfigError(
            f"{what}: {rho} <= 0.5 keeps fewer than 2 effective steps (1 / (1 - rho)), so the "
            f"variance is never identified; use rho > 0.5 (0.9 is the default) or give "
            f"NormalGammaPrior(beta0=...) in config.prior"
        )
    return rho


def check_source_weights(source_weights: Any) -> dict[str, float] | None:
    """Fixed ``lambda_k``: a mapping source -> finite number >= 0, or ``None``."""
    if source_weights is None:
        return None
    if not isinstance(source_weights, Mapping):
        raise ConfigError("source_weights: expected a mapping source name -> float, or None")
    out: dict[str, float] = {}
    for k, v in source_weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(
                f"source_weights[{k!r}]: expected a number, got {type(v).__name__}; give every "
                f"source a finite weight >= 0"
            )
        if not (math.isfinite(float(v)) and float(v) >= 0.0 and float(v) < 1e300):
            raise ConfigError(
                f"source_weights: must be finite numbers >= 0, got {{{k!r}: {v}}}; give every "
                f"source a finite weight >= 0"
            )
        out[str(k)] = float(v)
    return out


def named_parameters(params: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` pairs from parameters or pairs (default names ``param0``, ...)."""
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
