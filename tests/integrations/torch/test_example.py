"""examples/train_two_modality.py runs and learns (one short epoch per sample source)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from scripttools import load_script

pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "train_two_modality.py"


def load():
    return load_script(EXAMPLE)


def test_example_trains_with_microbatch(capsys):
    acc = load().main(["--samples", "microbatch", "--epochs", "2"])
    out = capsys.readouterr().out
    assert "epoch 0: test accuracy" in out
    # 4 classes, so chance is 0.25; the informative modality gets far above it.
    assert acc > 0.8
    # each epoch prints the mean over its own 24 steps (1536 rows / 64), so the two differ
    weights = re.findall(r"over the epoch's 24 calibrated steps (\{.*\})", out)
    assert len(weights) == 2
    first, second = (ast.literal_eval(w) for w in weights)
    assert set(first) == {"fusion", "a", "b"} and first != second
    # each source's weight is its mean over the calibrated dimensions it reaches, so each lies in
    # [0, 1]; the unimodal sources reach fewer dimensions than the fused one, so the sum exceeds 1
    # (test_calibrator checks the means against the per-tensor entries)
    assert all(0.0 <= v <= 1.0 for v in first.values())
    assert sum(first.values()) > 1.0


@pytest.mark.parametrize("samples", ["per_example", "steps", "laplace"])
def test_example_runs_every_sample_source(samples, capsys):
    acc = load().main(["--samples", samples, "--epochs", "1"])
    assert acc > 0.5
    assert "mean source weights" in capsys.readouterr().out
