"""Testing tools for bogc and for code built on it (public).

- :class:`Backend`, :class:`Namespace`, :func:`available_backends`: the one
  table of array namespaces that the test suite's fixtures and
  ``bogc validate`` run on, with the reason when one is absent here.
- :mod:`~bogc_core.testing.oracle`: the float64 oracle, an independent plain
  NumPy transcription of docs/method.md (brute force where the method is
  defined that way).
- :data:`IDENTITIES`, :func:`run`, :func:`format_table`: the closed-form
  checks of docs/method.md#identities behind ``bogc validate``.

Requires NumPy and SciPy only (both dependencies of bogc); pytest only for
:func:`namespace_params`, the fixture parameters of the test suite.
"""

from . import _oracle as oracle
from ._checks import (
    IDENTITIES,
    TOLERANCE,
    Identity,
    Result,
    available_namespaces,
    format_table,
    run,
)
from ._namespaces import ATOL, RTOL, Backend, Namespace, available_backends, namespace_params

__all__ = [
    "ATOL",
    "Backend",
    "IDENTITIES",
    "Identity",
    "Namespace",
    "RTOL",
    "Result",
    "TOLERANCE",
    "available_backends",
    "available_namespaces",
    "format_table",
    "oracle",
    "namespace_params",
    "run",
]
