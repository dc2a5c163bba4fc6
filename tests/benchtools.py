"""Shared helpers of the benchmark tests."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def docs_copy(tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of ``docs/results/bench`` and ``docs/benchmarks.md`` under ``tmp_path``, and the
    ``gen_bench_docs.py`` command line that reads and writes the copy."""
    results = tmp_path / "results"
    shutil.copytree(REPO / "docs" / "results" / "bench", results)
    doc = tmp_path / "benchmarks.md"
    shutil.copy(REPO / "docs" / "benchmarks.md", doc)
    script = [sys.executable, str(REPO / "scripts" / "gen_bench_docs.py"), "--results", str(results),
              "--doc", str(doc)]
    return results, script
