"""bogc: Bayesian-Oriented Gradient Calibration on any Array API namespace.

The pipeline of docs/method.md, one private module per stage, public names
here (``bogc_core.__all__``)::

    _statistics  GradientStats                       (Stage 0)
    _posterior   posterior, Posterior                (Stage 1)
    _evidence    evidence                            (Stage 2)
    _fusion      Opinion, reduced_dempster, combine  (Stages 3-4)
    _weights     fused_weights                       (Stage 5a)
    _calibration calibrate, calibrate_gradient           (Stage 5)
    _tensors     calibrate_tensors (several tensors, by scope)
    _inputs      validation of the sources, fixed weights and options
    _diagnostics Calibration.diagnostics
    _dispatch    the fast path of the input's array library, imported on demand
    _types       options, results, Decline (the leaf every module imports from)

``bogc_core.testing`` holds the float64 oracle and the table of array
namespaces; ``bogc_core.validate`` is the ``bogc validate`` command.
"""

from ._calibration import calibrate, calibrate_gradient
from ._dispatch import fast_paths, register_fast_path
from ._evidence import evidence
from ._fusion import Opinion, combine, fuse_single, reduced_dempster
from ._posterior import Posterior, posterior
from ._statistics import GradientStats
from ._tensors import calibrate_tensors
from ._types import (
    DEFAULT_CLIP,
    Array,
    Calibration,
    CalibrationConfig,
    Decline,
    EvidenceFrom,
    NormalGammaPrior,
    ScaleRule,
    Scope,
    WeightRule,
)
from ._weights import fused_weights
from .errors import (
    BOGCError,
    ConfigError,
    DistributedError,
    DTypeError,
    FastPathError,
    InsufficientSamplesError,
    NamespaceError,
    NonFiniteError,
    ShapeError,
    TotalConflictError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CLIP",
    "Array",
    "BOGCError",
    "Calibration",
    "CalibrationConfig",
    "ConfigError",
    "DTypeError",
    "Decline",
    "DistributedError",
    "EvidenceFrom",
    "FastPathError",
    "GradientStats",
    "InsufficientSamplesError",
    "NamespaceError",
    "NonFiniteError",
    "NormalGammaPrior",
    "Opinion",
    "Posterior",
    "ScaleRule",
    "Scope",
    "ShapeError",
    "TotalConflictError",
    "WeightRule",
    "calibrate",
    "calibrate_gradient",
    "calibrate_tensors",
    "combine",
    "evidence",
    "fast_paths",
    "fuse_single",
    "fused_weights",
    "posterior",
    "reduced_dempster",
    "register_fast_path",
]
