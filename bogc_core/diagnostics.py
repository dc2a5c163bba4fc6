"""Deprecated module path: use ``bogc_core`` (Calibration.diagnostics).

Every attribute is read from :mod:`bogc_core._diagnostics`.
"""

from __future__ import annotations

from typing import Any

from . import _diagnostics as _target
from ._deprecated import warn_moved

warn_moved("bogc_core.diagnostics", "bogc_core (Calibration.diagnostics)")


def __getattr__(name: str) -> Any:
    return getattr(_target, name)
