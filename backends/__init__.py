"""Fused fast paths of the calibration pipeline, one module per array library.

Importing this package registers every backend whose array library is
installed with :mod:`bogc_core.dispatch`; ``calibrate(..., backend="auto")``
then runs the one that accepts the input's namespace and device. Each is
tested equal to the reference in ``tests/backends``.
"""

from __future__ import annotations

from . import numpy_fused  # noqa: F401  (NumPy is a core dependency)

try:
    from . import torch_fused  # noqa: F401
except ImportError:  # PyTorch not installed
    pass

try:
    from . import torch_compiled  # noqa: F401  (opt-in: registered after torch-fused)
except ImportError:  # PyTorch not installed
    pass

try:
    from . import cupy_fused  # noqa: F401
except ImportError:  # CuPy not installed
    pass
