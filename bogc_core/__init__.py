"""bogc: Bayesian-Oriented Gradient Calibration on any Array API namespace.

The pipeline of docs/method.md, one module per stage:
:mod:`~bogc_core.stats` -> :mod:`~bogc_core.posterior` -> :mod:`~bogc_core.evidence`
-> :mod:`~bogc_core.opinion` -> :mod:`~bogc_core.weights` -> :mod:`~bogc_core.calibrate`.
"""

from ._types import NormalGammaPrior
from .calibrate import (
    Calibration,
    CalibrationConfig,
    calibrate,
    calibrate_gradient,
    calibrate_tensors,
)
from .errors import (
    BOGCError,
    ConfigError,
    DistributedError,
    DTypeError,
    InsufficientSamplesError,
    NamespaceError,
    NonFiniteError,
    ShapeError,
    TotalConflictError,
)
from .evidence import evidence
from .opinion import Opinion, combine, fuse_single, reduced_dempster
from .posterior import Posterior, posterior
from .stats import GradientStats

__version__ = "0.1.0"

__all__ = [
    "BOGCError",
    "Calibration",
    "CalibrationConfig",
    "ConfigError",
    "DistributedError",
    "DTypeError",
    "GradientStats",
    "InsufficientSamplesError",
    "NamespaceError",
    "NonFiniteError",
    "NormalGammaPrior",
    "Opinion",
    "Posterior",
    "ShapeError",
    "TotalConflictError",
    "calibrate",
    "calibrate_gradient",
    "calibrate_tensors",
    "combine",
    "evidence",
    "fuse_single",
    "posterior",
    "reduced_dempster",
]
