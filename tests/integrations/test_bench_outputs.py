"""``bogc bench`` as a new user meets it: the files it prints, an earlier run in ``--out``,
files it could not write, diagnostics on every epoch, a one-modality data set and the table's
wording."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from benchtools import toy_npz

pytest.importorskip("torch")
pytest.importorskip("matplotlib", reason="the plots need the bench extra (matplotlib)")

from bogc_core.integrations.bench import driver, main  # noqa: E402
from bogc_core.integrations.bench.methods import build  # noqa: E402
from bogc_core.integrations.bench.protocol import (  # noqa: E402
    MISSING_RULES,
    NOT_APPLICABLE,
    TrainConfig,
    train_run,
)
from bogc_core.integrations.bench.report import (  # noqa: E402
    counted,
    format_table,
    markdown_tables,
    pp,
)
from bogc_core.integrations.bench.settings import make_split  # noqa: E402
from bogc_core.integrations.data import load_dataset  # noqa: E402

TINY = ["--seeds", "2", "--tune-seeds", "1", "--epochs", "1", "--max-epochs", "2", "--patience", "1",
        "--no-progress", "--jobs", "1"]


_toy = toy_npz


def _printed(out: str) -> list[str]:
    return [line[len("wrote "):] for line in out.splitlines() if line.startswith("wrote ")]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("a refused run must not train")

    monkeypatch.setattr("bogc_core.integrations.bench.protocol.train_run", refuse)


def test_every_printed_path_exists_with_the_default_relative_out(tmp_path, monkeypatch, capsys):
    data = _toy(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["--dataset", str(data), "--methods", "sum,bogc", *TINY]) == 0
    printed = _printed(capsys.readouterr().out)
    assert printed == ["bogc-bench/results.json", "bogc-bench/accuracy_curves.png",
                       "bogc-bench/bogc_diagnostics.png"]
    assert all(Path(p).is_file() for p in printed)  # relative to the working folder


def test_every_printed_path_exists_with_a_relative_out_under_all(tmp_path, monkeypatch, capsys):
    data = _toy(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["--all", "--search", "--dataset", str(data), "--settings", "standard",
                 "--methods", "sum", "--out", "runs/first", *TINY]) == 0
    printed = _printed(capsys.readouterr().out)
    assert {"runs/first/toy/search.json", "runs/first/toy/standard/results.json",
            "runs/first/toy/standard/accuracy_curves.png", "runs/first/toy/cost_accuracy.png",
            "runs/first/summary.md"} <= set(printed)
    assert all(Path(p).is_file() for p in printed), printed
    # the run wrote exactly what planned_outputs said it would
    planned = driver.planned_outputs(driver._parser().parse_args(
        ["--all", "--search", "--settings", "standard"]), Path("runs/first"), ["toy"])
    assert sorted(map(str, planned)) == sorted(printed)


def test_a_second_run_refuses_to_replace_the_first_unless_overwrite(tmp_path, monkeypatch, capsys):
    data = _toy(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", str(data), "--methods", "sum", *TINY]
    assert main(argv) == 0
    first = _snapshot(tmp_path / "bogc-bench")
    capsys.readouterr()
    with monkeypatch.context() as m:
        _no_training(m)
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "--overwrite" in err[0]
    assert "results.json" in err[0] and "earlier run" in err[0]
    assert _snapshot(tmp_path / "bogc-bench") == first  # untouched
    # an unrelated file in --out is no earlier run; --overwrite replaces the run's own files only
    (tmp_path / "bogc-bench" / "notes.txt").write_text("mine")
    assert main([*argv, "--overwrite"]) == 0
    again = _snapshot(tmp_path / "bogc-bench")
    assert again["notes.txt"][0] == b"mine"
    assert again["results.json"][1] > first["results.json"][1]


def test_a_folder_with_only_other_files_is_not_an_earlier_run(tmp_path, capsys):
    out = tmp_path / "o"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "results.json").write_text("{}")
    assert main(["--dataset", str(_toy(tmp_path)), "--methods", "sum", "--out", str(out),
                 *TINY]) == 0
    assert (out / "results.json").is_file()


def test_an_unwritable_earlier_results_json_is_refused_before_training(tmp_path, monkeypatch,
                                                                       capsys):
    out = tmp_path / "o"
    out.mkdir()
    old = out / "results.json"
    old.write_text('{"earlier": true}')
    real_open = open

    def read_only(file, mode="r", *args, **kw):  # results.json read-only, even for root
        if Path(file) == old and any(c in mode for c in "wa+"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kw)

    monkeypatch.setattr(driver, "open", read_only, raising=False)
    _no_training(monkeypatch)
    before = _snapshot(out)
    assert main(["--dataset", str(_toy(tmp_path)), "--methods", "sum", "--out", str(out),
                 "--overwrite", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "results.json" in err and "Permission denied" in err
    assert _snapshot(out) == before  # no new plot beside the old results


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes read-only files; the test above simulates it for root")
def test_a_read_only_results_json_on_disk_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "results.json").chmod(0o444)
    before = _snapshot(out)
    assert main(["--dataset", str(_toy(tmp_path)), "--methods", "sum", "--out", str(out),
                 "--overwrite", *TINY]) == 2
    assert "results.json" in capsys.readouterr().err and _snapshot(out) == before


def test_a_folder_where_a_file_goes_is_refused_and_nothing_is_created(tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "o"
    (out / "accuracy_curves.png").mkdir(parents=True)
    _no_training(monkeypatch)
    assert main(["--dataset", str(_toy(tmp_path)), "--methods", "sum", "--out", str(out),
                 "--overwrite", *TINY]) == 2
    assert "accuracy_curves.png" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_curves.png"]
    # a missing --out is not created by a run refused for another reason
    assert main(["--dataset", str(tmp_path / "nowhere.npz"), "--out", str(tmp_path / "new"),
                 *TINY]) == 2
    assert not (tmp_path / "new").exists()


def test_bogc_diagnostics_are_recorded_on_every_epoch(tmp_path):
    split = make_split(load_dataset(_toy(tmp_path, n_per=120)), "standard")
    cfg = TrainConfig(max_epochs=6, patience=10, fixed_epochs=6, batch_size=16)
    r = train_run(split, build("bogc").with_params(lr=0.03), 0, cfg)
    steps = math.ceil(split.y_train.size / 16)
    assert steps > 5  # several steps per epoch, one of them sampled
    assert len(r["diagnostics"]) == 6
    for epoch in r["diagnostics"]:
        assert {"weight/fusion", "weight/a", "weight/b", "uncertainty"} <= set(epoch)
        assert all(math.isfinite(v) for v in epoch.values())


def test_quick_sized_run_has_no_gaps_in_the_diagnostics_curve(tmp_path, capsys):
    assert main(["--dataset", str(_toy(tmp_path)), "--methods", "sum,bogc", "--out",
                 str(tmp_path / "o"), "--seeds", "2", "--tune-seeds", "1", "--epochs", "4",
                 "--max-epochs", "4", "--no-progress", "--jobs", "1"]) == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    curves = doc["methods"]["bogc"]["diagnostics_curve_mean"]
    assert set(curves) == {"weight/fusion", "weight/a", "weight/b", "uncertainty"}
    for v in curves.values():
        assert len(v) == 4 and all(isinstance(x, float) and math.isfinite(x) for x in v)
    assert doc["methods"]["sum"]["curve_seeds"] == [2, 2, 2, 2]


def test_one_modality_data_set_runs_and_records_the_rule_that_cannot_apply(tmp_path, capsys):
    data = _toy(tmp_path, modalities=1, name="single")
    out = tmp_path / "o"
    assert main(["--dataset", str(data), "--setting", "missing", "--methods", "sum,bogc",
                 "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert doc["modalities"] == ["a"]
    assert doc["not_applicable"] == {"surviving_heads": NOT_APPLICABLE["surviving_heads"]}
    for table in ("methods", "fixed_budget"):
        for e in doc[table].values():
            rules = e["missing_rules"]
            assert set(rules) == set(MISSING_RULES)
            assert rules["surviving_heads"] == {"a": None}
            for rule in ("zero_fill", "mean_impute"):
                assert 0.0 <= rules[rule]["a"]["accuracy_mean"] <= 1.0
    assert "n/a" in text and "surviving_heads does not apply" in text
    assert any("n/a" in line for line in markdown_tables(doc))
    for png in ("accuracy_curves.png", "bogc_diagnostics.png"):
        assert (out / png).stat().st_size > 5000
    # the other settings run on it too
    assert main(["--all", "--dataset", str(data), "--settings", "standard,noisy", "--methods",
                 "sum,bogc", "--out", str(tmp_path / "all"), *TINY]) == 0


def test_table_wording_for_one_seed_and_a_zero_difference():
    assert counted(1, "seed") == "1 seed" and counted(2, "seed") == "2 seeds"
    assert pp(-0.00001) == "+0.00" and pp(-0.0) == "+0.00" and pp(-0.0001) == "-0.01"
    assert pp(0.0123) == "+1.23"
    block = {"accuracy_mean": 0.5, "accuracy_std": 0.0, "accuracies": [0.5]}
    diff = {"mean": -1e-6, "ci_low": math.nan, "ci_high": math.nan}
    doc = {"dataset": "toy", "setting": "standard", "seeds": [0], "modalities": ["a"],
           "split": {}, "train_config": {"patience": 1, "max_epochs": 1, "fixed_epochs": 1},
           "methods": {"sum": dict(block, seconds_ratio_to_sum=1.0, epochs_run_mean=1.0,
                                   unimodal_accuracy_mean={"a": 0.5}),
                       "bogc": dict(block, accuracy_diff_to_sum=diff, seconds_ratio_to_sum=2.0,
                                    epochs_run_mean=1.0, unimodal_accuracy_mean={"a": 0.5})},
           "fixed_budget": {"sum": block, "bogc": dict(block, accuracy_diff_to_sum=diff)}}
    for text in (format_table(doc), "\n".join(markdown_tables(doc))):
        assert "1 seed;" in text and "1 seeds" not in text and "1 epochs" not in text
        assert "-0.00" not in text and "+0.00" in text


def test_unknown_method_and_data_set_name_the_option_and_a_close_match(tmp_path, capsys):
    assert main(["--methods", "sum,pcgard", "--out", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "--methods" in err and "did you mean 'pcgrad'?" in err
    assert main(["--dataset", "av-digit", "--out", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "--dataset: 'av-digit'" in err and "did you mean 'av-digits'?" in err
    assert "name_or_path" not in err and "path of a .npz" in err
    assert not (tmp_path / "o").exists()


def test_the_readme_method_table_lists_every_method_bench_accepts():
    from bogc_core.integrations.bench.methods.registry import METHODS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # no header
    named = {n for line in rows for n in re.findall(r"`([^`]+)`", line.split("|")[2])}
    assert named - {"--search"} == set(METHODS)
