"""Validation of every :class:`GradientCalibrator` option, in one place.

The constructor, :meth:`GradientCalibrator.load_state_dict` and the Lightning
callback all check their options here, so that one bad value gives one
message whichever way it arrived.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch

from bogc_core import CalibrationConfig
from bogc_core.errors import ConfigError

__all__ = [
    "SAMPLES",
    "Diagnostics",
    "Options",
    "SampleKind",
    "check_rho",
    "check_source_weights",
    "named_parameters",
    "validate_options",
]

SampleKind = Literal["per_example", "microbatch", "laplace", "steps"]
Diagnostics = Literal["summary", "full", "none"]
SAMPLES: tuple[str, ...] = ("per_example", "microbatch", "laplace", "steps")


@dataclass(frozen=True)
class Options:
    """The calibrator's validated options (see :class:`GradientCalibrator`)."""

    config: CalibrationConfig
    samples: str
    chunks: int
    rho: float | None
    source_weights: dict[str, float] | None
    on_nonfinite: str
    diagnostics: str
    diagnostics_every: int
    chunk_bytes: int | None
    timeout: timedelta | None
    keep_statistics: bool


def check_rho(rho: Any, samples: str, config: CalibrationConfig, what: str = "rho") -> float | None:
    """``rho`` as a float in [0, 1] (``None`` stays ``None``); ``samples="steps"`` needs rho > 0.5
    unless the prior fixes the variance scale."""
    if rho is None:
        return None
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise ConfigError(f"{what}: must be a number in [0, 1] or None, got {type(rho).__name__}")
    rho = float(rho)
    if not 0.0 <= rho <= 1.0:
        raise ConfigError(f"{what}: must lie in [0, 1] (1 keeps every step), got {rho}")
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


def validate_options(
    config: Any,
    samples: Any,
    chunks: Any,
    rho: Any,
    source_weights: Any,
    *,
    on_nonfinite: Any,
    diagnostics: Any,
    diagnostics_every: Any,
    chunk_bytes: Any,
    timeout: Any,
    keep_statistics: Any,
) -> Options:
    """Every option checked, with the argument's name and the remedy in each error."""
    config = CalibrationConfig() if config is None else config
    if not isinstance(config, CalibrationConfig):
        raise ConfigError(f"config: expected CalibrationConfig, got {type(config).__name__}")
    if samples not in SAMPLES:
        raise ConfigError(f"samples: must be one of {SAMPLES}, got {samples!r}")
    if not (isinstance(chunks, int) and not isinstance(chunks, bool) and chunks >= 2):
        raise ConfigError(f"chunks: must be an int >= 2 (micro-batches per step), got {chunks!r}")
    if rho is None and samples == "steps":
        rho = 0.9
    rho = check_rho(rho, samples, config)
    if on_nonfinite not in ("raise", "plain"):
        raise ConfigError(f"on_nonfinite: must be 'raise' or 'plain', got {on_nonfinite!r}")
    if diagnostics not in ("summary", "full", "none"):
        raise ConfigError(f"diagnostics: must be 'summary', 'full' or 'none', got {diagnostics!r}")
    if not (isinstance(diagnostics_every, int) and not isinstance(diagnostics_every, bool)
            and diagnostics_every >= 1):
        raise ConfigError(
            f"diagnostics_every: must be an int >= 1 (1: every step), got {diagnostics_every!r}"
        )
    if chunk_bytes is not None and not (
        isinstance(chunk_bytes, int) and not isinstance(chunk_bytes, bool) and chunk_bytes > 0
    ):
        raise ConfigError(f"chunk_bytes: must be a positive int or None (sized from the model), "
                          f"got {chunk_bytes!r}")
    if timeout is not None and not isinstance(timeout, timedelta):
        raise ConfigError(f"timeout: expected a datetime.timedelta or None, got {type(timeout).__name__}")
    return Options(
        config=config,
        samples=str(samples),
        chunks=chunks,
        rho=rho,
        source_weights=check_source_weights(source_weights),
        on_nonfinite=str(on_nonfinite),
        diagnostics=str(diagnostics),
        diagnostics_every=diagnostics_every,
        chunk_bytes=chunk_bytes,
        timeout=timeout,
        keep_statistics=bool(keep_statistics),
    )
