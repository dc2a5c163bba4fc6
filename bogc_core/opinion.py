"""Deprecated module path: use ``bogc_core`` (Opinion, combine, fuse_single, reduced_dempster).

Every attribute is read from :mod:`bogc_core._fusion`.
"""

from __future__ import annotations

from typing import Any

from . import _fusion as _target
from ._deprecated import warn_moved

warn_moved("bogc_core.opinion", "bogc_core (Opinion, combine, fuse_single, reduced_dempster)")


def __getattr__(name: str) -> Any:
    return getattr(_target, name)
