"""Deprecated module path: use ``bogc_core`` (GradientStats).

Every attribute is read from :mod:`bogc_core._statistics`.
"""

from __future__ import annotations

from typing import Any

from . import _statistics as _target
from ._deprecated import warn_moved

warn_moved("bogc_core.stats", "bogc_core (GradientStats)")


def __getattr__(name: str) -> Any:
    return getattr(_target, name)
