"""Errors raised by bogc on bad input.

Every error derives from :class:`BOGCError` (itself a ``ValueError``), names
the offending argument and says what would be accepted, so that a user can fix
the call without reading the source.
"""

from __future__ import annotations

__all__ = [
    "BOGCError",
    "ShapeError",
    "NamespaceError",
    "DTypeError",
    "NonFiniteError",
    "InsufficientSamplesError",
    "TotalConflictError",
    "ConfigError",
    "DistributedError",
]


class BOGCError(ValueError):
    """Base class of every error bogc raises on bad input."""


class ShapeError(BOGCError):
    """Arrays whose shapes do not fit together."""


class NamespaceError(BOGCError):
    """Arrays from different array libraries or on different devices."""


class DTypeError(BOGCError):
    """Arrays of a dtype the method cannot work in (not real floating)."""


class NonFiniteError(BOGCError):
    """NaN or infinite values in gradients or statistics."""


class InsufficientSamplesError(BOGCError):
    """Too few gradient samples to identify a variance (docs/method.md, Stage 1)."""


class TotalConflictError(BOGCError):
    """Dempster's normaliser ``1 - C`` is at or near zero (docs/method.md, Stage 4)."""


class ConfigError(BOGCError):
    """An option outside its documented range."""


class DistributedError(BOGCError):
    """Ranks of a process group disagree, or a peer failed."""
