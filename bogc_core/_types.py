"""The leaf of the package: options, their allowed values, and the result type.

Every other module of ``bogc_core`` (and every backend and integration)
imports these names downward from here; this module imports nothing of the
package but :mod:`.errors`, so no import cycle can pass through it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, get_args

from .errors import ConfigError

__all__ = [
    "Array",
    "EvidenceFrom",
    "WeightRule",
    "ScaleRule",
    "Scope",
    "DEFAULT_CLIP",
    "NormalGammaPrior",
    "CalibrationConfig",
    "Calibration",
    "Decline",
]

#: Any array of a namespace that follows the Array API standard.
Array = Any

EvidenceFrom = Literal["snr", "precision"]
WeightRule = Literal["evidence", "dempster", "uniform"]
ScaleRule = Literal["belief", "none"]
Scope = Literal["tensor", "global"]

EVIDENCE_FROM: tuple[str, ...] = get_args(EvidenceFrom)
WEIGHTS: tuple[str, ...] = get_args(WeightRule)
SCALES: tuple[str, ...] = get_args(ScaleRule)
SCOPES: tuple[str, ...] = get_args(Scope)
DEFAULT_CLIP = math.log(1e6)


class Decline(Exception):
    """Raised by a fast path that cannot handle an input (an option, dtype or
    device it does not support). The dispatcher then runs the reference and
    records ``reason`` in the diagnostics under ``"fallback"``. Not an error
    the user sees."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class NormalGammaPrior:
    """Conjugate prior ``NG(mu0, kappa0, alpha0, beta0)``.

    ``beta0=None`` selects the empirical-Bayes default ``beta0 = alpha0 * vbar``
    with ``vbar`` the group's mean per-sample variance ``mean_d(M2/n)``
    (taken over dimensions with ``n >= 2``), which keeps the method
    equivariant to the scale of the gradients.
    """

    mu0: float = 0.0
    kappa0: float = 0.0
    alpha0: float = 1.0
    beta0: float | None = None

    def __post_init__(self) -> None:
        for name in ("mu0", "kappa0", "alpha0") + (("beta0",) if self.beta0 is not None else ()):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name}: must be a finite real number, got {v!r}")
        if self.kappa0 < 0:
            raise ConfigError(f"kappa0: must be >= 0 (0 is the flat default), got {self.kappa0}")
        if self.alpha0 < 0:
            raise ConfigError(f"alpha0: must be >= 0 (1 is the default), got {self.alpha0}")
        if self.beta0 is not None and self.beta0 < 0:
            raise ConfigError(
                f"beta0: must be >= 0, or None for the empirical-Bayes default, got {self.beta0}"
            )


@dataclass(frozen=True)
class CalibrationConfig:
    """Options of :func:`calibrate` (defaults of docs/method.md).

    ``fast_path`` chooses the implementation: ``"auto"`` takes the fast path
    of the input's array library when it accepts the input, ``"reference"``
    forces the Array API reference, any other name asks for that fast path
    (``bogc_core.fast_paths()`` lists them).
    """

    gamma: float = 0.5
    evidence_from: EvidenceFrom = "snr"
    prior_weight: float = 1.0
    prior: NormalGammaPrior = field(default_factory=NormalGammaPrior)
    weights: WeightRule = "evidence"
    scale: ScaleRule = "belief"
    s_max: float | None = None
    clip: float = DEFAULT_CLIP
    scope: Scope = "tensor"
    fast_path: str = "auto"

    def __post_init__(self) -> None:
        if self.prior is None:  # None asks for the default prior
            object.__setattr__(self, "prior", NormalGammaPrior())

        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"{name}: must be {allowed}, got {getattr(self, name)!r}")

        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma >= 0):
            raise bad("gamma", "a finite number >= 0 (0.5 is the default)")
        if self.evidence_from not in EVIDENCE_FROM:
            raise bad("evidence_from", f"one of {EVIDENCE_FROM}")
        if not (isinstance(self.prior_weight, (int, float)) and 0 < self.prior_weight < math.inf):
            raise bad("prior_weight", "a finite number > 0 (1 is the default)")
        if not isinstance(self.prior, NormalGammaPrior):
            raise bad("prior", "a NormalGammaPrior")
        if self.weights not in WEIGHTS:
            raise bad("weights", f"one of {WEIGHTS}")
        if self.scale not in SCALES:
            raise bad("scale", f"one of {SCALES}")
        if self.s_max is not None and not (isinstance(self.s_max, (int, float)) and self.s_max > 0):
            raise bad("s_max", "None or a number > 0")
        if not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise bad("clip", "a number > 0 (log(1e6) is the default)")
        if self.scope not in SCOPES:
            raise bad("scope", f"one of {SCOPES}")
        if not isinstance(self.fast_path, str):
            raise bad("fast_path", "'auto', 'reference' or the name of a fast path")


class Calibration:
    """Result of :func:`calibrate` for one group.

    Attributes
    ----------
    gradient : array ``(*shape)``
        The calibrated update ``g_hat``.
    weights : array ``(S, *shape)``
        Source weights ``w`` (sum over the first axis is 1).
    uncertainty : array ``(*shape)``
        Fused uncertainty ``U = prod_k u_k``.
    belief_scale : array ``(*shape)``
        ``s = B / mean(B)`` (ones with ``scale="none"``).
    evidence : array ``(S, *shape)``
        Per-source evidence ``e``.
    sources : tuple of str
        Source names, in the order of the first axis of ``weights``.
    diagnostics : dict
        Plain Python floats and flags (computed on first access).
    """

    def __init__(
        self,
        gradient: Array,
        weights: Array,
        uncertainty: Array,
        belief_scale: Array,
        evidence: Array,
        sources: Sequence[str],
        prior_weight: float = 1.0,
        flags: Mapping[str, Any] | None = None,
    ) -> None:
        self.gradient = gradient
        self.weights = weights
        self.uncertainty = uncertainty
        self.belief_scale = belief_scale
        self.evidence = evidence
        self.sources = tuple(sources)
        self.prior_weight = prior_weight
        self.flags = dict(flags or {})

    @cached_property
    def diagnostics(self) -> dict[str, Any]:
        from ._diagnostics import summarize

        return summarize(self)

    def __repr__(self) -> str:
        return (
            f"Calibration(shape={tuple(self.gradient.shape)}, sources={self.sources}, "
            f"path={self.flags.get('path', 'reference')!r})"
        )
