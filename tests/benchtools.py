"""Shared helpers of the benchmark tests."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

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


def toy_npz(folder: Path, modalities: int = 2, n_per: int = 30, name: str = "toy") -> Path:
    """A small user data set ``folder/<name>.npz``: 3 classes of ``n_per`` rows, ``x_a`` (5
    features, separable by class) and, with two modalities, ``x_b`` (2 features of noise)."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), n_per)
    centers = rng.normal(size=(3, 5)) * 3
    arrays = {"x_a": centers[y] + rng.normal(size=(y.size, 5))}
    if modalities == 2:
        arrays["x_b"] = rng.normal(size=(y.size, 2))
    path = folder / f"{name}.npz"
    np.savez(path, y=y, **arrays)
    return path
