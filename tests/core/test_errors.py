"""bogc_core.errors: the error hierarchy."""

from __future__ import annotations

import bogc_core as bc
from bogc_core.errors import (
    ConfigError,
    DTypeError,
    InsufficientSamplesError,
    NamespaceError,
    NonFiniteError,
    ShapeError,
    TotalConflictError,
)


def test_all_errors_are_bogc_and_value_errors():
    for cls in (
        ConfigError,
        DTypeError,
        InsufficientSamplesError,
        NamespaceError,
        NonFiniteError,
        ShapeError,
        TotalConflictError,
    ):
        assert issubclass(cls, bc.BOGCError)
        assert issubclass(cls, ValueError)
