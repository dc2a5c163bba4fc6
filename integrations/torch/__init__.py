"""PyTorch integration: BOGC in a training loop.

:class:`GradientCalibrator` turns per-source losses into calibrated
``p.grad`` (see ``docs/integrations.md``); the sample sources
(:class:`Microbatch`, :class:`PerExample`, :class:`Laplace`, :class:`Steps`),
:class:`Distributed` and :class:`Diagnostics` carry its options.
"""

from .calibrator import GradientCalibrator
from .collective_step import Distributed
from .distributed import DistributedError
from .laplace import Laplace
from .microbatch import Microbatch
from .options import SAMPLES, Diagnostics
from .per_example import PerExample
from .steps import Steps

__all__ = [
    "GradientCalibrator", "Diagnostics", "Distributed", "DistributedError", "Laplace",
    "Microbatch", "PerExample", "SAMPLES", "Steps",
]
