"""``bogc bench``: the quick smoke run (what CI runs), the results.json contract, metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
from bogc_core.integrations.bench import main, write_summary
from bogc_core.integrations.cli import main as cli_main
from bogc_core.integrations.experiments.metrics import accuracy, macro_f1, paired_difference
from bogc_core.integrations.experiments.registry import expand

PNG = b"\x89PNG\r\n\x1a\n"


def _check_schema(doc, seeds, must=("sum", "bogc")):
    assert isinstance(doc["dataset"], str) and isinstance(doc["setting"], str)
    for name in must:
        assert name in doc["methods"]
    for name, e in doc["methods"].items():
        assert isinstance(e["accuracy_mean"], float) and isinstance(e["accuracy_std"], float)
        assert len(e["accuracies"]) == seeds
        assert e["accuracy_mean"] == pytest.approx(float(np.mean(e["accuracies"])))
        assert e["accuracy_std"] == pytest.approx(float(np.std(e["accuracies"], ddof=1)))
        assert all(0.0 <= a <= 1.0 for a in e["accuracies"])
        if name != "sum":
            d = e["accuracy_diff_to_sum"]
            base = doc["methods"]["sum"]["accuracies"]
            assert d["mean"] == pytest.approx(float(np.mean(np.subtract(e["accuracies"], base))))


def test_quick_run_writes_results_and_plots(tmp_path, capsys):
    rc = cli_main(["bench", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    _check_schema(doc, seeds=2)
    assert doc["dataset"] == "av-digits" and doc["setting"] == "standard"
    bogc = doc["methods"]["bogc"]
    curves = bogc["diagnostics_curve_mean"]
    assert {"weight/fusion", "weight/audio", "weight/image", "uncertainty"} <= set(curves)
    assert len(bogc["test_curve_mean"]) == doc["epochs"]
    for png in ("accuracy_curves.png", "bogc_diagnostics.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG
    out = capsys.readouterr().out
    assert "diff to sum" in out and "bogc" in out


def test_user_npz_missing_setting(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    centers = rng.normal(size=(3, 4)) * 2
    np.savez(tmp_path / "toy.npz", y=y, x_left=centers[y] + rng.normal(size=(120, 4)),
             x_right=rng.normal(size=(120, 3)))
    rc = main(["--dataset", str(tmp_path / "toy.npz"), "--setting", "missing", "--methods", "sum,pcgrad",
               "--seeds", "2", "--epochs", "2", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    _check_schema(doc, seeds=2)
    assert doc["setting"] == "missing" and doc["dataset"] == "toy"
    for e in doc["methods"].values():
        by = e["removed_modality"]
        assert set(by) == {"left", "right"}
        assert e["accuracy_mean"] == pytest.approx(
            np.mean([np.mean([by[m]["accuracies"][i] for m in by]) for i in range(2)]))
    assert "# bogc bench summary" in write_summary(tmp_path).read_text()


def test_bad_arguments_are_reported(tmp_path, capsys):
    assert main(["--dataset", "nope", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "name_or_path" in capsys.readouterr().err
    assert main(["--methods", "sum,whatever", "--out", str(tmp_path), "--no-progress"]) == 2


def test_methods_expansion():
    assert expand("sum,bogc,sum") == ["sum", "bogc"]
    assert "bogc_w_dempster" in expand("ablations") and "pcgrad" not in expand("ablations")


def test_macro_f1_against_a_hand_count():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 2, 2])
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 2/4; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(y, p, 3) == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)
    assert accuracy(y, p) == pytest.approx(4 / 6)


def test_paired_difference_matches_scipy_interval():
    a = [0.91, 0.93, 0.90, 0.95, 0.92]
    b = [0.90, 0.90, 0.91, 0.93, 0.90]
    d = np.subtract(a, b)
    lo, hi = scipy.stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy.stats.sem(d))
    r = paired_difference(a, b)
    assert r["mean"] == pytest.approx(d.mean())
    assert r["ci_low"] == pytest.approx(lo) and r["ci_high"] == pytest.approx(hi)
    assert math.isnan(paired_difference([1.0], [0.5])["ci_low"])


def _toy(tmp_path):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 40)
    centers = rng.normal(size=(3, 5)) * 3
    path = tmp_path / "toy.npz"
    np.savez(path, y=y, x_a=centers[y] + rng.normal(size=(120, 5)), x_b=rng.normal(size=(120, 2)))
    return path


@pytest.mark.parametrize("extra, key, value", [
    (["--setting", "fewshot", "--shots", "3"], "shots", 3),
    (["--setting", "noisy", "--noise-std", "0.5", "--noise-modality", "b"], "noise_modality", "b"),
])
def test_fewshot_and_noisy_settings_from_the_command_line(tmp_path, extra, key, value):
    rc = main(["--dataset", str(_toy(tmp_path)), "--methods", "sum", "--seeds", "2", "--epochs", "1",
               "--out", str(tmp_path / "o"), "--no-progress", *extra])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    _check_schema(doc, seeds=2)
    assert doc["split"][key] == value
    if key == "shots":
        assert doc["split"]["n_train"] == 9


def test_tuning_picks_the_best_validation_point_and_never_the_test_split(tmp_path):
    from bogc_core.integrations.data import load_dataset
    from bogc_core.integrations.experiments import TrainConfig, build, make_split, tune

    split = make_split(load_dataset(_toy(tmp_path)), "standard")
    split.y_test = np.zeros_like(split.y_test)  # a corrupted test split must not matter
    m = build("sum")
    m.grid = {"lr": [1e-7, 0.1]}
    chosen, record = tune(split, m, TrainConfig(epochs=3, curves=False), seeds=[0])
    assert record["chosen"] == {"lr": 0.1} and chosen.lr == 0.1
    vals = {g["params"]["lr"]: g["val_accuracy"] for g in record["grid"]}
    assert vals[0.1] > vals[1e-7]


def test_configured_uses_the_tuned_defaults_and_bogc_lr_for_ablations():
    from bogc_core.integrations.experiments.registry import DEFAULTS, configured

    assert configured("sum", "av-digits").lr == DEFAULTS["av-digits"]["sum"]["lr"]
    assert configured("bogc_w_dempster", "mfeat").lr == DEFAULTS["mfeat"]["bogc"]["lr"]
    assert configured("bogc", "mfeat", {"bogc": {"lr": 0.5}}).lr == 0.5
    assert configured("ogm_ge", "av-digits").alpha == DEFAULTS["av-digits"]["ogm_ge"]["alpha"]
