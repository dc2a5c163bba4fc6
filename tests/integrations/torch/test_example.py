"""examples/train_two_modality.py runs and learns (one short epoch per sample source)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "train_two_modality.py"


def load():
    spec = importlib.util.spec_from_file_location("train_two_modality", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_trains_with_microbatch(capsys):
    acc = load().main(["--samples", "microbatch", "--epochs", "1"])
    out = capsys.readouterr().out
    assert "epoch 0: test accuracy" in out
    # 4 classes, so chance is 0.25; one epoch of the informative modality gets far above it.
    assert acc > 0.8


@pytest.mark.parametrize("samples", ["per_example", "steps", "laplace"])
def test_example_runs_every_sample_source(samples, capsys):
    acc = load().main(["--samples", samples, "--epochs", "1"])
    assert acc > 0.5
    assert "mean source weights" in capsys.readouterr().out
