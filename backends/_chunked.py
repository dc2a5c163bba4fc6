"""Former name of :mod:`._blocked` (a "chunk" is a micro-batch elsewhere in the project).

Kept so that code importing the old private name keeps working; import
:mod:`bogc_core.backends._blocked` instead.
"""

from __future__ import annotations

from ._blocked import (  # noqa: F401
    Ops,
    decline_reason,
    evidence_range_problem,
    hugepage_buffer,
    run_blocked,
)

run_chunked = run_blocked

__all__ = ["Ops", "run_chunked", "run_blocked", "evidence_range_problem", "decline_reason", "hugepage_buffer"]
