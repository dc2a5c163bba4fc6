"""``bogc bench``: the quick smoke run (what CI runs), the results.json contract, the protocol,
the statistics, the arguments, the converter and the generated docs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchtools import toy_npz
from bogc_core.integrations.bench import main
from bogc_core.integrations.bench.methods.registry import GRID, MAIN_METHODS, expand
from bogc_core.integrations.bench.metrics import (
    accuracy,
    example_bootstrap,
    holm,
    macro_f1,
    paired_difference,
)
from bogc_core.integrations.bench.protocol import (
    MISSING_RULES,
    TrainConfig,
    choose,
    train_run,
    tune,
)
from bogc_core.integrations.bench.settings import make_split
from bogc_core.integrations.cli import main as cli_main
from bogc_core.integrations.data import load_dataset

PNG = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]
TINY = ["--seeds", "2", "--tune-seeds", "1", "--epochs", "1", "--max-epochs", "2", "--patience", "1",
        "--no-progress", "--jobs", "1"]


def _check_block(e, seeds, base=None):
    assert isinstance(e["accuracy_mean"], float) and isinstance(e["accuracy_std"], float)
    assert len(e["accuracies"]) == seeds
    assert e["accuracy_mean"] == pytest.approx(float(np.mean(e["accuracies"])))
    assert e["accuracy_std"] == pytest.approx(float(np.std(e["accuracies"], ddof=1)))
    assert all(0.0 <= a <= 1.0 for a in e["accuracies"])
    if base is not None:
        d = e["accuracy_diff_to_sum"]
        assert d["mean"] == pytest.approx(float(np.mean(np.subtract(e["accuracies"], base))))


def _check_schema(doc, seeds, must=("sum", "bogc")):
    assert isinstance(doc["dataset"], str) and isinstance(doc["setting"], str)
    for name in must:
        assert name in doc["methods"]
    for table in ("methods", "fixed_budget"):
        base = doc[table]["sum"]["accuracies"]
        for name, e in doc[table].items():
            _check_block(e, seeds, None if name == "sum" else base)
            if name != "sum":
                assert "p_holm" in e["accuracy_diff_to_sum"]


def _toy(tmp_path, n_per=40):
    return toy_npz(tmp_path, n_per=n_per)


def test_quick_run_writes_results_and_plots_and_prints_every_path(tmp_path, capsys):
    rc = cli_main(["bench", "--quick", "--out", str(tmp_path), "--no-progress", "--jobs", "1"])
    assert rc == 0
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    doc = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    _check_schema(doc, seeds=2)
    assert doc["dataset"] == "av-mnist" and doc["setting"] == "standard"
    bogc = doc["methods"]["bogc"]
    curves = bogc["diagnostics_curve_mean"]
    assert {"weight/fusion", "weight/audio", "weight/image", "uncertainty"} <= set(curves)
    assert len(bogc["test_curve_mean"]) == max(len(bogc["val_curve_mean"]), 1)
    # everything tried on validation is recorded, one entry per grid point, with the choices
    for n in ("sum", "bogc", "pcgrad"):
        rec = doc["tuning"][n]
        assert [g["params"]["lr"] for g in rec["grid"]] == rec["tried"]
        assert set(GRID["lr"]) <= set(rec["tried"])
        last = [g for g in rec["grid"] if g["params"]["lr"] in rec["rungs"][-1]["lr"]]
        assert rec["chosen"]["plateau"] == choose(last, "plateau")
        assert doc["hyperparameters"][n]["plateau"] == rec["chosen"]["plateau"]
    out = capsys.readouterr().out
    for name in ("results.json", "accuracy_curves.png", "bogc_diagnostics.png"):
        assert (tmp_path / name).is_file() and f"wrote {tmp_path / name}" in out
    for png in ("accuracy_curves.png", "bogc_diagnostics.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG
    assert "diff to sum" in out


def test_user_npz_missing_setting_reports_every_rule(tmp_path):
    rc = main(["--dataset", str(_toy(tmp_path)), "--setting", "missing", "--methods", "sum,pcgrad",
               "--out", str(tmp_path / "o"), *TINY])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    _check_schema(doc, seeds=2)
    assert doc["setting"] == "missing" and doc["dataset"] == "toy"
    base = doc["methods"]["sum"]["missing_rules"]
    for name, e in doc["methods"].items():
        assert set(e["missing_rules"]) == set(MISSING_RULES)
        for rule in MISSING_RULES:
            by = e["missing_rules"][rule]
            assert set(by) == {"a", "b"}
            for m, b in by.items():
                _check_block(b, 2, None if name == "sum" else base[rule][m]["accuracies"])
        zf = e["missing_rules"]["zero_fill"]
        assert e["accuracy_mean"] == pytest.approx(
            np.mean([np.mean([zf[m]["accuracies"][i] for m in zf]) for i in range(2)]))


def test_missing_rules_against_a_hand_computation():
    import torch
    from bogc_core.integrations.bench.model import MultiModalNet
    from bogc_core.integrations.bench.protocol import _tensors, evaluate

    data = load_dataset("mfeat")
    split = make_split(data, "standard", max_train=64)
    torch.manual_seed(0)
    model = MultiModalNet({m: x.shape[1] for m, x in zip(split.modalities, split.train)}, 10, 8, 4)
    xtr, xte, xva = _tensors(split.train), _tensors(split.test), _tensors(split.val)
    got = evaluate(model, split, xtr, xte, xva)["missing_correct"]
    with torch.no_grad():
        hs = [enc(x) for enc, x in zip(model.encoders, xte)]
        means = [enc(x).mean(0) for enc, x in zip(model.encoders, xtr)]
        probs = [torch.softmax(h(f), 1) for h, f in zip(model.heads, hs)]
        for i, m in enumerate(split.modalities):
            zero = [torch.zeros_like(h) if j == i else h for j, h in enumerate(hs)]
            mean = [means[i].expand_as(h) if j == i else h for j, h in enumerate(hs)]
            for rule, feats in (("zero_fill", zero), ("mean_impute", mean)):
                pred = model.fusion_head(torch.cat(feats, 1)).argmax(1).numpy()
                np.testing.assert_array_equal(got[rule][m], pred == split.y_test)
            surv = sum(p for j, p in enumerate(probs) if j != i) / (len(probs) - 1)
            np.testing.assert_array_equal(got["surviving_heads"][m], surv.argmax(1).numpy() == split.y_test)


def test_early_stopping_restores_the_best_validation_epoch_and_keeps_the_fixed_budget(tmp_path):
    from bogc_core.integrations.bench.methods import build

    split = make_split(load_dataset(_toy(tmp_path)), "standard")
    cfg = TrainConfig(max_epochs=12, patience=2, fixed_epochs=3)
    r = train_run(split, build("sum").with_params(lr=0.05), 0, cfg)
    vc = r["val_curve"]
    assert r["epochs_run"] == len(vc) and cfg.fixed_epochs <= len(vc) <= cfg.max_epochs
    best = int(np.argmax(vc))  # first maximum
    assert r["best_epoch"] == best + 1 and r["val_accuracy"]["plateau"] == vc[best]
    assert r["results"]["plateau"]["val_accuracy"] == pytest.approx(vc[best])
    assert r["val_accuracy"]["fixed"] == vc[cfg.fixed_epochs - 1]
    assert r["results"]["fixed"]["val_accuracy"] == pytest.approx(vc[cfg.fixed_epochs - 1])
    if len(vc) < cfg.max_epochs:  # stopped: `patience` epochs without a gain after the best
        assert len(vc) - 1 - best >= cfg.patience
    assert r["results"]["plateau"]["accuracy"] == pytest.approx(r["results"]["plateau"]["correct"].mean())


def test_tuning_uses_validation_only_and_the_stated_tie_rule(tmp_path):
    from bogc_core.integrations.bench.methods import build

    split = make_split(load_dataset(_toy(tmp_path)), "standard")
    split.y_test = np.zeros_like(split.y_test)  # a corrupted test split must not matter
    rec = tune(split, build("sum"), TrainConfig(max_epochs=3, fixed_epochs=2, patience=1),
               {"lr": [1e-7, 0.1]}, seeds=[0, 1, 2])
    assert rec["chosen"]["plateau"] == {"lr": 0.1}
    for g in rec["grid"]:
        assert len(g["val_accuracies"]["plateau"]) == 3
        assert g["val_accuracy"]["plateau"] == pytest.approx(np.mean(g["val_accuracies"]["plateau"]))
    tied = [{"params": {"lr": 0.01}, "val_accuracy": {"plateau": 0.5}},
            {"params": {"lr": 0.03}, "val_accuracy": {"plateau": 0.5}},
            {"params": {"lr": 0.1}, "val_accuracy": {"plateau": 0.4}}]
    assert choose(tied, "plateau") == {"lr": 0.01}  # ties: the smaller learning rate


def test_fewshot_standardises_with_the_fewshot_rows_only():
    data = load_dataset("av-digits")
    split = make_split(data, "fewshot", seed=3, shots=5)
    for x in split.train:
        np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
        sd = x.std(0)
        np.testing.assert_allclose(sd[sd > 1e-3], 1.0, rtol=1e-4)
    assert split.y_train.size == 5 * data.n_classes


@pytest.mark.parametrize("extra, key, value", [
    (["--setting", "fewshot", "--shots", "3"], "shots", 3),
    (["--setting", "noisy", "--noise-std", "0.5", "--noise-modality", "b"], "noise_modality", "b"),
])
def test_fewshot_and_noisy_settings_from_the_command_line(tmp_path, extra, key, value):
    rc = main(["--dataset", str(_toy(tmp_path)), "--methods", "sum", "--out", str(tmp_path / "o"),
               *TINY, *extra])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    _check_schema(doc, seeds=2)
    assert doc["split"][key] == value
    if key == "shots":
        assert doc["split"]["n_train"] == 9


def test_all_and_search_with_an_unrelated_results_json_under_out(tmp_path, capsys):
    out = tmp_path / "o"
    (out / "elsewhere").mkdir(parents=True)
    (out / "elsewhere" / "results.json").write_text(json.dumps({"something": "else"}))
    rc = main(["--all", "--search", "--dataset", str(_toy(tmp_path)), "--settings", "standard,missing",
               "--methods", "sum", "--out", str(out), *TINY])
    assert rc == 0
    summary = (out / "summary.md").read_text()
    assert "toy / standard" in summary and "toy / missing" in summary and "something" not in summary
    search = json.loads((out / "toy" / "search.json").read_text())
    assert set(search["variants"]) == {"bogc_ev_precision", "bogc_gamma_anneal", "bogc_smax2"}
    for rec in search["variants"].values():
        assert [g["params"] for g in rec["grid"]] == [{"lr": search["lr"]}]
    printed = capsys.readouterr().out
    for p in ("toy/standard/results.json", "toy/missing/results.json", "toy/cost_accuracy.png",
              "toy/search.json", "summary.md"):
        assert (out / p).is_file() and f"wrote {out / p}" in printed
    # a later run reuses the validation choices instead of tuning again
    assert main(["--all", "--dataset", str(_toy(tmp_path)), "--settings", "fewshot-5", "--methods", "sum",
                 "--reuse-tuning", str(out), "--out", str(tmp_path / "again"), *TINY]) == 0
    first = json.loads((out / "toy" / "standard" / "results.json").read_text())
    again = json.loads((tmp_path / "again" / "toy" / "fewshot-5" / "results.json").read_text())
    assert again["tuning"]["sum"] == first["tuning"]["sum"]
    assert again["hyperparameters"]["sum"] == first["tuning"]["sum"]["chosen"]
    assert main(["--reuse-tuning", str(tmp_path / "nowhere"), "--dataset", str(_toy(tmp_path)),
                 "--out", str(tmp_path / "x"), *TINY]) == 2


@pytest.mark.parametrize("argv, needle", [
    (["--seeds", "0"], "--seeds"),
    (["--epochs", "0"], "--epochs"),
    (["--max-epochs", "0"], "--max-epochs"),
    (["--tune-seeds", "0"], "--tune-seeds"),
    (["--epochs", "5", "--max-epochs", "3"], "--max-epochs"),
    (["--noise-std", "nan"], "--noise-std"),
    (["--settings", "standard,bogus"], "--settings"),
    (["--dataset", "nope"], "--dataset"),
    (["--methods", "sum,whatever"], "methods"),
])
def test_bad_arguments_are_one_line_errors_before_training(tmp_path, capsys, argv, needle):
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress", "--jobs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o" / "results.json").exists()


def test_unwritable_out_is_reported_before_any_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["--out", str(blocker / "o"), "--no-progress", "--jobs", "1"]) == 2  # fails even for root
    err = capsys.readouterr().err
    assert "--out" in err and "writable" in err and len(err.strip().splitlines()) == 1


def test_help_text_for_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    from bogc_core.integrations.bench.driver import _parser

    for action in _parser()._actions:
        assert action.help, action.option_strings
    assert "--setting" in text and "fewshot" in text


def test_methods_expansion():
    assert expand("sum,bogc,sum") == ["sum", "bogc"]
    assert "bogc_w_dempster" in expand("ablations") and "pcgrad" not in expand("ablations")
    assert "bogc_normmatched" in MAIN_METHODS and "mgda_per_encoder" in expand("ablations")


# ------------------------------------------------------------------ statistics
def test_macro_f1_against_a_hand_count():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 2, 2])
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 2/4; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(y, p, 3) == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)
    assert accuracy(y, p) == pytest.approx(4 / 6)


def test_paired_difference_matches_a_hand_t_interval_and_test():
    a = [0.91, 0.93, 0.90, 0.95, 0.92]
    b = [0.90, 0.90, 0.91, 0.93, 0.90]
    d = np.subtract(a, b)
    n = d.size
    se = d.std(ddof=1) / math.sqrt(n)
    t = d.mean() / se
    # the t quantile and tail from the regularised incomplete beta function (not scipy.stats.t)
    from scipy.special import betainc, stdtrit

    p = betainc((n - 1) / 2, 0.5, (n - 1) / (n - 1 + t * t))
    q = stdtrit(n - 1, 0.975)
    r = paired_difference(a, b)
    assert r["mean"] == pytest.approx(d.mean())
    assert r["ci_low"] == pytest.approx(d.mean() - q * se) and r["ci_high"] == pytest.approx(d.mean() + q * se)
    assert r["p"] == pytest.approx(p)
    assert math.isnan(paired_difference([1.0], [0.5])["ci_low"])
    same = paired_difference([0.5, 0.6], [0.5, 0.6])
    assert same["ci_low"] == same["ci_high"] == 0.0 and same["p"] == 1.0
    shifted = paired_difference([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])  # equal differences up to rounding
    assert shifted["ci_low"] == shifted["ci_high"] == pytest.approx(0.1) and math.isnan(shifted["p"])


def test_holm_against_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted finite: 0.005, 0.01, 0.03, 0.04 (m = 4): 4*0.005, 3*0.01, 2*0.03, 1*0.04, cumulative max
    expected = {3: 0.02, 0: 0.03, 2: 0.06, 1: 0.06}
    got = holm(p)
    for i, v in expected.items():
        assert got[i] == pytest.approx(v)
    assert math.isnan(got[4])
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_example_bootstrap_against_a_brute_force_percentile_interval():
    rng = np.random.default_rng(0)
    a = rng.random((3, 200)) < 0.8
    b = rng.random((3, 200)) < 0.7
    r = example_bootstrap(a, b, n_resamples=4000, seed=1)
    d = (a.astype(float) - b).mean(0)
    assert r["mean"] == pytest.approx(d.mean())
    boots = np.array([d[rng.integers(0, d.size, d.size)].mean() for _ in range(4000)])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    assert r["ci_low"] == pytest.approx(lo, abs=0.012) and r["ci_high"] == pytest.approx(hi, abs=0.012)
    assert r["ci_low"] < d.mean() < r["ci_high"]


# ------------------------------------------------------------------ converter and package data
def _fake_mat(path, n=30, classes=3):
    import scipy.io

    rng = np.random.default_rng(0)
    cell = np.empty((1, 2), dtype=object)
    cell[0, 0] = rng.normal(size=(4, n))
    cell[0, 1] = rng.normal(size=(2, n))
    gt = (np.arange(n) % classes + 1).astype(np.uint8)[:, None]
    scipy.io.savemat(path, {"X": cell, "gt": gt})
    return cell, gt


def test_converter_checks_sha256_and_writes_a_stratified_split(tmp_path, monkeypatch, capsys):
    from bogc_core.integrations.data import convert as conv

    cell, gt = _fake_mat(tmp_path / "f.mat")
    assert conv.main([str(tmp_path / "f.mat"), str(tmp_path / "o.npz")]) == 2
    assert "sha256" in capsys.readouterr().err
    monkeypatch.setitem(conv.KNOWN, conv.sha256(tmp_path / "f.mat"), ("fake", ("u", "v")))
    assert conv.main([str(tmp_path / "f.mat"), str(tmp_path / "o.npz")]) == 0
    assert f"wrote {tmp_path / 'o.npz'}" in capsys.readouterr().out
    d = load_dataset(tmp_path / "o.npz")
    assert d.modalities == ("u", "v") and d.split_given
    np.testing.assert_allclose(d.x["u"], cell[0, 0].T.astype(np.float32))
    np.testing.assert_array_equal(d.y, gt[:, 0] - 1)
    assert np.bincount(d.y[d.test_mask]).tolist() == [2, 2, 2]  # round(0.2 * 10) per class
    again = conv.stratified_test_mask(d.y)
    np.testing.assert_array_equal(again, d.test_mask)  # fixed seed: the same split every time


def test_converter_runs_as_a_module(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bogc_core.integrations.data.convert", "--help"],
                       capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "sha256" in r.stdout


@pytest.mark.parametrize("name", ["scene15_mtv.mat", "PIE_face_10.mat"])
def test_pinned_digests_match_the_public_files(name):
    from bogc_core.integrations.data import convert as conv

    raw = os.environ.get("BOGC_RAW_DATA")
    if not raw or not (Path(raw) / "multiview" / name).is_file():
        pytest.skip("set BOGC_RAW_DATA to the folder of raw downloads to check the pinned sums")
    src = Path(raw) / "multiview" / name
    assert conv.sha256(src) in conv.KNOWN


def test_scene15_and_pie_are_never_package_data():
    from importlib.resources import files

    data = files("bogc_core.integrations.data")
    names = [p.name for p in data.iterdir()]
    assert not [n for n in names if n.endswith(".mat") or "scene" in n.lower() or "pie" in n.lower()]
    toml = (REPO / "pyproject.toml").read_text()
    assert "scene" not in toml.lower() and ".mat" not in toml


# ------------------------------------------------------------------ generated docs
def test_docs_tables_match_the_results_files():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_bench_docs.py"), "--check"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_docs_check_fails_on_drift(tmp_path):
    from benchtools import docs_copy

    results, script = docs_copy(tmp_path)
    assert subprocess.run([*script, "--check"], capture_output=True).returncode == 0
    f = results / "pie" / "standard" / "results.json"
    d = json.loads(f.read_text())
    d["methods"]["bogc"]["accuracy_mean"] += 0.01  # one number changes: the page is out of date
    f.write_text(json.dumps(d))
    r = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert r.returncode == 1 and "out of date" in r.stdout
    assert subprocess.run(script, capture_output=True).returncode == 0  # regenerating fixes it
    assert subprocess.run([*script, "--check"], capture_output=True).returncode == 0
