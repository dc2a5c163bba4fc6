"""Old import paths kept working, with a :class:`DeprecationWarning`.

The stage modules were renamed to private ones (``stats`` -> ``_statistics``
and so on); ``bogc_core.calibrate``, ``bogc_core.evidence`` and
``bogc_core.posterior`` are the public *functions* of those names, so their
old module paths live only in ``sys.modules`` (``from bogc_core.calibrate
import X`` keeps working) and never shadow the functions.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType
from typing import Any

__all__ = ["AliasModule", "install_alias", "warn_moved"]


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{old} is deprecated; import {new} instead", DeprecationWarning, stacklevel=stacklevel
    )


class AliasModule(ModuleType):
    """A module object that forwards every attribute to ``targets``, with a warning."""

    def __init__(self, name: str, targets: tuple[str, ...], new: str) -> None:
        super().__init__(name, f"Deprecated alias of {', '.join(targets)}; import {new} instead.")
        self._targets = targets
        self._new = new

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                public = getattr(sys.modules.get("bogc_core"), "__all__", ())
                where = self._new if attr in public else target
                warn_moved(f"{self.__name__}.{attr}", f"{attr} from {where}")
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


def install_alias(name: str, targets: tuple[str, ...], new: str) -> None:
    """Make ``from <name> import X`` read ``X`` from the first of ``targets`` that
    has it (with a warning)."""
    sys.modules.setdefault(name, AliasModule(name, targets, new))
