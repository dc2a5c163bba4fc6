"""Deprecated module path: use ``bogc_core`` (fast_paths, register_fast_path).

Every attribute is read from :mod:`bogc_core._dispatch`.
"""

from __future__ import annotations

from typing import Any

from . import _dispatch as _target
from ._deprecated import warn_moved

warn_moved("bogc_core.dispatch", "bogc_core (fast_paths, register_fast_path)")


def __getattr__(name: str) -> Any:
    if name == "register":  # the first spelling of register_fast_path
        return _target.register_fast_path
    return getattr(_target, name)
