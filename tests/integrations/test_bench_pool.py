"""``bogc bench --jobs``: runs in worker processes give the numbers of one process, an error
in a worker reaches the caller, and a bad ``--jobs`` is refused before any training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib", reason="the plots need the bench extra (matplotlib)")

from bogc_core.integrations.bench import main  # noqa: E402
from bogc_core.integrations.bench.pool import Pool  # noqa: E402

ARGS = ["--methods", "sum,bogc,pcgrad,mgda", "--seeds", "3", "--tune-seeds", "2", "--epochs", "1",
        "--max-epochs", "3", "--patience", "1", "--no-progress"]


def _toy(folder: Path) -> Path:
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 30)
    centers = rng.normal(size=(3, 6)) * 0.4
    path = folder / "toy.npz"
    np.savez(path, y=y, x_a=centers[y] + rng.normal(size=(y.size, 6)),
             x_b=rng.normal(size=(y.size, 3)) + 0.3 * y[:, None])
    return path


def _timeless(doc):
    """``doc`` without wall-clock entries (they differ between any two runs)."""
    if isinstance(doc, dict):
        return {k: _timeless(v) for k, v in doc.items() if "second" not in k}
    if isinstance(doc, list):
        return [_timeless(v) for v in doc]
    return doc


def test_two_workers_give_the_numbers_of_one_process(tmp_path):
    data = _toy(tmp_path)
    docs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert main(["--dataset", str(data), *ARGS, "--jobs", jobs, "--out", str(out)]) == 0
        docs.append(json.loads((out / "results.json").read_text()))
    one, two = (_timeless(d) for d in docs)
    assert one["tuning"] == two["tuning"]  # the learning-rate search, run by run
    assert one["methods"] == two["methods"]  # every evaluation run, seed by seed
    assert one == two
    # the comparison is not empty: every run is recorded, and the search's runs differ
    assert len(docs[0]["methods"]) == 4
    assert all(len(m["accuracies"]) == 3 for m in docs[0]["methods"].values())
    val = [g["val_accuracy"]["fixed"] for g in docs[0]["tuning"]["bogc"]["grid"]]
    assert len(val) == 8 and len(set(val)) > 1  # 6 base points and 2 extensions


def _tasks(keys):
    """``math.sqrt`` tasks (importable by a spawned worker, unlike this module): key ``k``
    computes ``sqrt(k*k - 4)``, which fails for ``k = 0, 1`` and is ``sqrt(5)`` for 3."""
    return [(k, math.sqrt, (float(k * k - 4),)) for k in keys]


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_run_raises_its_error_in_the_caller(jobs):
    with Pool(jobs, threads=1) as pool:
        got = {}
        with pytest.raises(ValueError, match="math domain error"):
            for key, value in pool.run(_tasks([2, 3, 1, 4])):
                got[key] = value
    assert 1 not in got and all(got[k] == math.sqrt(k * k - 4) for k in got)
    if jobs == 1:  # in order: the runs before the failure came back with their results
        assert got == {2: 0.0, 3: math.sqrt(5)}


def test_results_come_back_keyed_whatever_the_order():
    with Pool(2, threads=1) as pool:
        got = dict(pool.run(_tasks([5, 2, 7, 3])))
    assert got == {k: math.sqrt(k * k - 4) for k in (5, 2, 7, 3)}


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_jobs_below_one_is_refused_before_training(tmp_path, capsys, bad):
    out = tmp_path / "o"
    assert main(["--dataset", str(_toy(tmp_path)), *ARGS, "--jobs", bad, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and ">= 1" in err
    assert not out.exists()

