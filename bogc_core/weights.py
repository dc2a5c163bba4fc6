"""Deprecated module path: use ``bogc_core.fused_weights`` (the old ``source_weights()``).

Every attribute is read from :mod:`bogc_core._weights`.
"""

from __future__ import annotations

from typing import Any

from . import _weights as _target
from ._deprecated import warn_moved

warn_moved("bogc_core.weights", "bogc_core.fused_weights (the old source_weights())")


def __getattr__(name: str) -> Any:
    return getattr(_target, name)
