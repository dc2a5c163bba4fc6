"""``bogc bench``'s tuning protocol and statistics: the edge-extended learning-rate grid with
successive halving (equal budget, interior flags), the minimum detectable effect, the one
marking rule, Holm recomputed from stored per-seed values, and strict JSON."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from benchtools import toy_npz
from bogc_core.integrations.bench import main, protocol
from bogc_core.integrations.bench.methods import build
from bogc_core.integrations.bench.methods.registry import (
    LR_BASE,
    LR_EXTENSIONS,
    LR_GRID,
    lr_at,
)
from bogc_core.integrations.bench.metrics import (
    holm,
    min_detectable_effect,
    paired_difference,
    t_power,
)
from bogc_core.integrations.bench.report import MARKS, diff_text, format_table, legend, mark, restat
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
TINY = ["--seeds", "3", "--tune-seeds", "2", "--epochs", "1", "--max-epochs", "2", "--patience",
        "1", "--no-progress", "--jobs", "1"]


# ------------------------------------------------------------------ the learning-rate search
class _Fake:
    """Stands in for ``train_run``: validation accuracy a fixed function of (lr, seed)."""

    def __init__(self, plateau, fixed=None, diverge_above=math.inf):
        self.plateau, self.fixed = plateau, fixed or plateau
        self.diverge_above = diverge_above
        self.calls: list[tuple[float, int]] = []

    def __call__(self, split, method, seed, cfg, on_step=None, evaluate_test=True):
        assert not evaluate_test  # tuning never looks at the test split
        self.calls.append((method.lr, seed))
        lr = method.lr
        return {"val_accuracy": {"plateau": self.plateau(lr, seed), "fixed": self.fixed(lr, seed)},
                "diverged": 3 if lr > self.diverge_above else 0, "epochs_run": 3, "seconds": 0.0}


def _peak(at: float, noise: float = 0.0):
    """A validation curve peaked at ``at`` on a log axis, with a small seed-dependent wobble."""
    return lambda lr, seed: 0.9 - 0.1 * abs(math.log10(lr / at)) + noise * ((seed * 7919) % 5)


def _tune(monkeypatch, fake, seeds=(100, 101, 102)):
    monkeypatch.setattr(protocol, "train_run", fake)
    return protocol.tune_lr(None, build("sum"), protocol.TrainConfig(), list(seeds), lr_at,
                            LR_BASE, LR_EXTENSIONS)


def test_the_ladder_and_the_base_grid_span_more_than_100x():
    assert LR_GRID == [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    assert LR_GRID[-1] / LR_GRID[0] >= 100
    ratios = np.diff(np.log10([lr_at(k) for k in range(-9, 4)]))
    assert np.all((ratios > 0.47) & (ratios < 0.53))  # about half a decade per step


@pytest.mark.parametrize("peak, added, chosen", [
    (3.0, [3.0, 10.0], 3.0),        # best at the upper edge: extend up, then up again
    (0.001, [0.001, 0.0003], 0.001),  # best at the lower edge: extend down twice
    (10.0, [3.0, 10.0], 10.0),      # still at the edge after both extensions: not interior
    (0.03, [0.001, 0.0003], 0.03),  # interior: the spare points go beyond the nearer edge
    (0.3, [3.0, 10.0], 0.3),
])
def test_grid_extends_beyond_the_edge_where_the_best_point_sits(monkeypatch, peak, added, chosen):
    rec = _tune(monkeypatch, _Fake(_peak(peak)))
    assert [e["lr"] for e in rec["extensions"]] == added
    assert rec["tried"] == sorted(LR_GRID + added)
    assert rec["chosen"] == {"plateau": {"lr": chosen}, "fixed": {"lr": chosen}}
    interior = rec["tried"][0] < chosen < rec["tried"][-1]
    assert rec["interior"] == {"plateau": interior, "fixed": interior}
    assert interior == (peak != 10.0)
    causes = [(e["cause"], e["selection"]) for e in rec["extensions"]]
    if peak in (0.03, 0.3):
        assert causes == [("spare", None)] * 2
    else:  # the first extension is forced by the plateau edge (fixed shares the curve)
        assert causes[0] == ("edge", "plateau")


def test_each_selection_gets_its_own_edge_extension(monkeypatch):
    # plateau prefers large steps, the fixed budget small ones: one extension each
    rec = _tune(monkeypatch, _Fake(_peak(3.0), _peak(0.001)))
    assert [(e["lr"], e["cause"], e["selection"]) for e in rec["extensions"]] == [
        (3.0, "edge", "plateau"), (0.001, "edge", "fixed")]
    assert rec["chosen"]["plateau"] == {"lr": 3.0} and rec["chosen"]["fixed"] == {"lr": 0.001}
    assert rec["interior"] == {"plateau": False, "fixed": False}  # each is now the new edge


@pytest.mark.parametrize("peak", [0.001, 0.03, 3.0, 30.0])
@pytest.mark.parametrize("seeds", [(100,), (100, 101), (100, 101, 102), (1, 2, 3, 4, 5)])
def test_every_method_trains_the_same_number_of_configurations(monkeypatch, peak, seeds):
    fake = _Fake(_peak(peak, noise=0.01))
    rec = _tune(monkeypatch, fake, seeds)
    n = len(LR_GRID) + LR_EXTENSIONS
    want = n + sum(math.ceil(n / 2 ** r) for r in range(1, len(seeds)))
    assert len(fake.calls) == rec["configurations"] == want
    assert want == protocol.tuning_budget(len(LR_GRID), LR_EXTENSIONS, len(seeds))
    assert len(set(fake.calls)) == len(fake.calls)  # no run is repeated
    # successive halving: rung r holds ceil(n / 2^r) points, each trained on seeds[: r + 1]
    for r, rung in enumerate(rec["rungs"]):
        assert len(rung["lr"]) == math.ceil(n / 2 ** r) and rung["seeds"] == list(seeds[: r + 1])
        for lr in rung["lr"]:
            g = next(g for g in rec["grid"] if g["params"]["lr"] == lr)
            assert g["seeds"][: r + 1] == list(seeds[: r + 1])
    for g in rec["grid"]:
        assert g["val_accuracy"]["plateau"] == pytest.approx(np.mean(g["val_accuracies"]["plateau"]))
        assert len(g["seeds"]) == g["rung"] + 1
    last = rec["rungs"][-1]["lr"]
    for sel in ("plateau", "fixed"):  # the choice is the best of the last rung, by brute force
        pool = [g for g in rec["grid"] if g["params"]["lr"] in last]
        top = max(g["val_accuracy"][sel] for g in pool)
        assert rec["chosen"][sel]["lr"] == min(g["params"]["lr"] for g in pool
                                               if g["val_accuracy"][sel] == top)


def test_halving_keeps_the_best_of_each_selection(monkeypatch):
    rec = _tune(monkeypatch, _Fake(_peak(0.1), _peak(0.01)))
    for r in range(1, len(rec["rungs"])):
        alive = rec["rungs"][r - 1]["lr"]
        seeds = rec["rungs"][r - 1]["seeds"]
        for sel in ("plateau", "fixed"):
            score = {lr: np.mean([_peak(0.1 if sel == "plateau" else 0.01)(lr, s) for s in seeds])
                     for lr in alive}
            assert max(score, key=lambda k: (score[k], -k)) in rec["rungs"][r]["lr"]


def test_a_diverged_run_scores_zero(monkeypatch):
    # the curve keeps rising with lr, but every lr above 0.1 diverges
    rec = _tune(monkeypatch, _Fake(lambda lr, s: min(0.99, 0.5 + lr), diverge_above=0.1))
    assert rec["chosen"]["plateau"] == {"lr": 0.1} and rec["interior"]["plateau"]
    for g in rec["grid"]:
        if g["params"]["lr"] > 0.1:
            assert all(g["diverged"]) and g["val_accuracy"]["plateau"] == 0.0


def test_a_real_diverging_run_stops_and_says_so():
    from bogc_core.integrations.bench.settings import make_split
    from bogc_core.integrations.data import load_dataset

    split = make_split(load_dataset("mfeat"), "standard", max_train=128)
    cfg = protocol.TrainConfig(max_epochs=6, fixed_epochs=3, patience=5, hidden=8, feat=4)
    for name in ("sum", "bogc"):  # bogc's calibrator refuses a non-finite gradient itself
        r = protocol.train_run(split, build(name).with_params(lr=1e4), 0, cfg)
        assert 1 <= r["diverged"] == r["epochs_run"] < cfg.max_epochs
        assert len(r["val_curve"]) == r["epochs_run"] and r["results"]["fixed"] is not None
    ok = protocol.train_run(split, build("sum").with_params(lr=0.03), 0, cfg)
    assert ok["diverged"] == 0


# ------------------------------------------------------------------ minimum detectable effect
@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_mde_has_80_percent_power_by_monte_carlo(n):
    sd = 0.013
    mde = min_detectable_effect(sd, n)
    assert t_power(mde, sd, n) == pytest.approx(0.8, abs=1e-9)
    rng = np.random.default_rng(n)
    reps = 40000
    d = rng.normal(mde, sd, size=(reps, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    crit = scipy.stats.t.ppf(0.975, n - 1)
    power = np.mean(np.abs(t) > crit)
    assert power == pytest.approx(0.8, abs=4 * math.sqrt(0.16 / reps))


def test_mde_tends_to_the_normal_closed_form_for_many_pairs():
    z = scipy.stats.norm.ppf
    for n in (400, 2000):
        closed = (z(0.975) + z(0.8)) * 1.0 / math.sqrt(n)
        assert min_detectable_effect(1.0, n) == pytest.approx(closed, rel=3.0 / n + 1e-4)
    assert min_detectable_effect(2.0, 7) == pytest.approx(2 * min_detectable_effect(1.0, 7))
    assert math.isnan(min_detectable_effect(1.0, 1)) and min_detectable_effect(0.0, 5) == 0.0


def test_paired_difference_stores_the_mde_of_its_own_spread():
    a, b = [0.91, 0.93, 0.90, 0.95, 0.92], [0.90, 0.90, 0.91, 0.93, 0.90]
    r = paired_difference(a, b)
    assert r["sd"] == pytest.approx(np.std(np.subtract(a, b), ddof=1))
    assert r["mde"] == pytest.approx(min_detectable_effect(r["sd"], 5))


# ------------------------------------------------------------------ one marking rule
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-30, 30), min_size=2, max_size=8), st.integers(0, 3))
def test_the_mark_follows_the_printed_t_interval(diffs, shift):
    base = [0.5 + 0.001 * i for i in range(len(diffs))]
    a = [b + d / 300 + shift / 300 for b, d in zip(base, diffs)]
    r = paired_difference(a, base)
    r["p_holm"] = holm([r["p"], 0.01, 0.2])[0]
    m = mark(r)
    covers = r["ci_low"] <= 0 <= r["ci_high"]
    assert (m == "level") == covers
    if not covers and r["ci_low"] < r["ci_high"]:
        assert r["p"] < 0.05  # the t interval excludes 0 exactly when p < 0.05
        assert m == ("*" if r["p_holm"] < 0.05 else "~")
    if covers and r["ci_low"] < r["ci_high"]:
        assert r["p"] >= 0.05 - 1e-9
    text = diff_text(r, bootstrap=False)
    assert text.split("]")[1].split()[0] == m
    assert m in MARKS


def test_a_zero_spread_gets_a_consistent_mark_and_no_p():
    r = paired_difference([0.90, 0.91, 0.92], [0.9067, 0.9167, 0.9267])  # -0.67 pp every seed
    assert r["ci_low"] == r["ci_high"] == pytest.approx(r["mean"])
    assert math.isnan(r["p"]) and math.isnan(r["mde"])
    r["p_holm"] = holm([r["p"], 0.04])[0]
    assert math.isnan(r["p_holm"]) and holm([r["p"], 0.04])[1] == 0.04  # left out of Holm
    assert mark(r) == "="
    r["bootstrap"] = {"mean": r["mean"], "ci_low": -0.02, "ci_high": 0.01}  # shown, not deciding
    assert mark(r) == "=" and "=" in diff_text(r)
    same = paired_difference([0.5, 0.6], [0.5, 0.6])
    assert mark(same) == "level" and same["p"] == 1.0


def test_the_bootstrap_never_decides_the_mark():
    r = paired_difference([0.90, 0.93, 0.95], [0.88, 0.90, 0.91])
    r["p_holm"] = r["p"]
    r["bootstrap"] = {"mean": r["mean"], "ci_low": -0.5, "ci_high": 0.5}
    assert r["ci_low"] > 0 and mark(r) in ("*", "~")


# ------------------------------------------------------------------ recomputed statistics
def _doc():
    rng = np.random.default_rng(3)
    methods, fixed = {}, {}
    for table in (methods, fixed):
        for n in ("sum", "a", "b", "c"):
            accs = (0.8 + 0.02 * rng.standard_normal(4)).tolist()
            table[n] = {"accuracies": accs, "accuracy_mean": float(np.mean(accs)),
                        "accuracy_std": float(np.std(accs, ddof=1))}
            if n != "sum":
                table[n]["accuracy_diff_to_sum"] = {"mean": 0.0, "ci_low": -9.0, "ci_high": 9.0,
                                                    "p": 0.5, "p_holm": 0.123, "n": 4}
    return {"setting": "standard", "methods": methods, "fixed_budget": fixed}


def test_restat_recomputes_every_p_and_the_holm_adjustment():
    doc = restat(_doc())
    for table in ("methods", "fixed_budget"):
        m = doc[table]
        names = ["a", "b", "c"]
        fresh = [paired_difference(m[n]["accuracies"], m["sum"]["accuracies"]) for n in names]
        adj = holm([f["p"] for f in fresh])
        for n, f, h in zip(names, fresh, adj):
            d = m[n]["accuracy_diff_to_sum"]
            for k in ("mean", "ci_low", "ci_high", "p", "mde"):
                assert d[k] == pytest.approx(f[k])
            assert d["p_holm"] == pytest.approx(h)
        # Holm by its definition: sorted p times (m - rank), running maximum, capped at 1
        ps = sorted(f["p"] for f in fresh)
        want = np.minimum(1, np.maximum.accumulate([(3 - i) * p for i, p in enumerate(ps)]))
        assert sorted(m[n]["accuracy_diff_to_sum"]["p_holm"] for n in names) == pytest.approx(want)


def test_gen_bench_docs_never_reuses_a_stored_p(tmp_path):
    from benchtools import docs_copy

    results, script = docs_copy(tmp_path)
    for f in results.glob("*/*/results.json"):
        d = json.loads(f.read_text())
        for table in ("methods", "fixed_budget"):
            for e in d[table].values():
                if "accuracy_diff_to_sum" in e:  # stale statistics: p, Holm, interval, mde
                    e["accuracy_diff_to_sum"].update(p=0.0, p_holm=0.0, ci_low=1.0, ci_high=2.0,
                                                     mde=0.5)
        f.write_text(json.dumps(d))
    r = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ a tiny real run
def _strict_load(path: Path):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


_toy = toy_npz


def test_a_tiny_run_writes_strict_json_with_mde_grid_budget_and_interior_flags(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["--dataset", str(_toy(tmp_path)), "--setting", "missing", "--methods", "sum,pcgrad",
               "--out", str(out), *TINY])
    assert rc == 0
    doc = _strict_load(out / "results.json")
    n_diff = 0
    for table in ("methods", "fixed_budget"):
        for name, e in doc[table].items():
            blocks = [e] + [b for r in e["missing_rules"].values() for b in r.values()]
            for b in blocks:
                if name == "sum":
                    assert "accuracy_diff_to_sum" not in b
                    continue
                d = b["accuracy_diff_to_sum"]
                n_diff += 1
                assert "mde" in d and "p_holm" in d
                if d["mde"] is not None:
                    assert d["mde"] == pytest.approx(min_detectable_effect(d["sd"], 3))
    assert n_diff == 2 * 2 * (1 + 3 * 2)  # bogc, pcgrad: headline + 3 rules x 2 modalities, 2 tables
    proto = doc["protocol"]
    assert proto["base_grid"] == LR_GRID and proto["extensions_per_method"] == LR_EXTENSIONS
    budget = protocol.tuning_budget(len(LR_GRID), LR_EXTENSIONS, 2)
    assert proto["budget"] == {"sum": budget, "bogc": budget, "pcgrad": budget}
    flags = [(n, s, r["interior"][s]) for n, r in doc["tuning"].items() for s in ("plateau", "fixed")]
    assert proto["interior"]["of"] == len(flags) == 6
    assert proto["interior"]["count"] == sum(f for *_, f in flags)
    for n, rec in doc["tuning"].items():
        assert set(LR_GRID) <= set(rec["tried"]) and rec["configurations"] == budget
        for s in ("plateau", "fixed"):
            lr = rec["chosen"][s]["lr"]
            assert rec["interior"][s] == (min(rec["tried"]) < lr < max(rec["tried"]))
            assert doc["hyperparameters"][n][s] == rec["chosen"][s]
    printed = capsys.readouterr().out
    assert legend(3) in printed and all(f"{k}: " in legend(3) for k in MARKS)
    # the table's text is the one the stored document gives, statistics recomputed
    assert format_table(restat(doc)).splitlines()[-1] == legend(3)


def test_no_tune_and_reuse_tuning_still_work(tmp_path):
    toy = _toy(tmp_path)
    assert main(["--dataset", str(toy), "--methods", "sum", "--no-tune", "--out", str(tmp_path / "n"),
                 *TINY]) == 0
    doc = _strict_load(tmp_path / "n" / "results.json")
    assert doc["tuning"] == {} and doc["protocol"]["tuning"].startswith("off")
    assert doc["hyperparameters"]["bogc"]["plateau"] == {"lr": 0.03}
    assert main(["--all", "--dataset", str(toy), "--settings", "standard", "--methods", "sum",
                 "--out", str(tmp_path / "t"), *TINY]) == 0
    assert main(["--all", "--dataset", str(toy), "--settings", "noisy", "--methods", "sum",
                 "--reuse-tuning", str(tmp_path / "t"), "--out", str(tmp_path / "r"), *TINY]) == 0
    first = _strict_load(tmp_path / "t" / "toy" / "standard" / "results.json")
    again = _strict_load(tmp_path / "r" / "toy" / "noisy" / "results.json")
    assert again["tuning"] == first["tuning"]
    assert again["protocol"]["interior"] == first["protocol"]["interior"]


# ------------------------------------------------------------------ the confirmatory table
def _gen_module():
    from scripttools import load_script

    return load_script(REPO / "scripts" / "gen_bench_docs.py")


def _noisy_doc(diffs: list[float]) -> dict:
    from bogc_core.integrations.bench.report import restat

    base = [0.80 + 0.01 * (i % 3) for i in range(len(diffs))]
    entry = lambda accs: {"accuracy_mean": float(np.mean(accs)), "accuracies": accs,  # noqa: E731
                          "accuracy_diff_to_sum": {}}
    doc = {"setting": "noisy", "seeds": list(range(len(diffs))), "split": {"noise_modality": "m"},
           "methods": {"sum": {"accuracy_mean": float(np.mean(base)), "accuracies": base},
                       "bogc": entry([b + d for b, d in zip(base, diffs)])},
           "fixed_budget": {}}
    return restat(doc)


def test_confirmatory_table_applies_holm_across_data_sets_and_the_registered_rule():
    gen = _gen_module()
    n = gen.CONFIRM_SEEDS
    up = [0.03 + 0.002 * (i % 2) for i in range(n)]           # clearly positive
    down = [-0.03 - 0.002 * (i % 2) for i in range(n)]        # clearly negative
    flat = [0.004 * (-1) ** i for i in range(n)]              # centred on 0
    docs = [("a", "noisy", _noisy_doc(up)), ("b", "noisy", _noisy_doc(down)),
            ("c", "noisy", _noisy_doc(flat)), ("d", "standard", _noisy_doc(up)),
            ("e", "noisy", _noisy_doc(up[:3]))]               # wrong setting / seed count: left out
    rows = [r for r in gen.confirmatory(docs) if r.split(" | ")[0] in ("| a", "| b", "| c", "| d", "| e")]
    assert [r.split(" | ")[0] for r in rows] == ["| a", "| b", "| c"]
    ps = [d["methods"]["bogc"]["accuracy_diff_to_sum"]["p"] for _, _, d in docs[:3]]
    holm = sorted(ps)  # Holm by hand: p_(i) * (m - i), monotone
    adj = {p: min(1.0, max(q * (3 - j) for j, q in enumerate(holm[: holm.index(p) + 1])))
           for p in ps}
    for row, p in zip(rows, ps):
        assert f"{adj[p]:.3g}" in row.split(" | ")[7]
    assert rows[0].endswith("| supported |") and rows[1].endswith("| contradicted |")
    assert rows[2].endswith("| level |")


def test_positive_control_lists_what_differs_after_holm_on_the_default_table_only():
    gen = _gen_module()
    n = 10
    up = [0.03 + 0.002 * (i % 2) for i in range(n)]           # clearly positive
    flat = [0.004 * (-1) ** i for i in range(n)]              # centred on 0
    default = gen.DEFAULT_TABLE
    assert gen.positive_control([("other", "standard", _noisy_doc(up))]) == ["(not run yet)"]
    hit = gen.positive_control([(*default, _noisy_doc(up))])
    assert "1 of 1 comparisons" in hit[0]
    assert hit[2].startswith("- `bogc`: +3.10 pp")
    miss = gen.positive_control([(*default, _noisy_doc(flat))])
    assert len(miss) == 1 and "none" in miss[0]
