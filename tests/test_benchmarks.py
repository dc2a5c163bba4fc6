"""Smoke runs of the benchmark scripts that reach into the calibrator's stages, so that a
change of its internals cannot leave a benchmark broken (the numbers are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_step_benchmark_times_every_stage(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "step.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "step.py"), "--quick", "--stages", "--no-memory",
           "--models", "multimodal", "--rounds", "1", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    stages = json.loads(out.read_text())["models"]["multimodal"]["stages_s"]["64"]
    assert set(stages) == {"statistics", "fill", "calibration", "write", "rest", "total"}
    assert stages["statistics"] > 0 and stages["calibration"] > 0 and stages["total"] > 0
