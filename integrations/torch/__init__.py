"""PyTorch integration: BOGC in a training loop.

:class:`GradientCalibrator` turns per-source losses into calibrated
``p.grad`` (see ``docs/integrations.md``).
"""

from .calibrator import SAMPLES, GradientCalibrator
from .distributed import DistributedError

__all__ = ["GradientCalibrator", "DistributedError", "SAMPLES"]
