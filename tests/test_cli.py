"""The ``bogc`` command: help texts, one-line user errors (exit 2), tracebacks only for bugs.

Every bad data file of the user ``.npz`` format is run through the command line
(``bogc data check`` and ``bogc bench --dataset``) and must end in exit status 2
and one line on stderr that names the key at fault, with no traceback.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from bogc_core.integrations import cli
from bogc_core.integrations.cli import COMMANDS, EXIT_BUG, EXIT_USAGE, main
from bogc_core.integrations.data import (
    MIN_TEST_PER_CLASS,
    MIN_TRAIN_PER_CLASS,
    DataError,
    load_dataset,
)

from bogc_core import BOGCError, ShapeError


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(("bogc: error: ", "bogc bench: error: ")), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


def good_arrays(n_per_class: int = 10, n_classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = n_per_class * n_classes
    return {"y": np.repeat(np.arange(n_classes), n_per_class), "x_a": rng.normal(size=(n, 4)),
            "x_b": rng.normal(size=(n, 2, 3))}


# --------------------------------------------------------------------- help texts
def test_top_level_help_describes_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for name, text in COMMANDS.items():
        assert name in out and " ".join(text.split()[:4]) in " ".join(out.split())
    assert "--debug" in out


def _all_actions(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    found = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for choice in a._choices_actions:
                found.append((f"{parser.prog} {choice.dest}", choice))
            for sub in a.choices.values():
                found += _all_actions(sub)
        else:
            found.append((parser.prog, a))
    return found


def test_every_option_and_subcommand_has_help() -> None:
    actions = _all_actions(cli._top_parser()) + _all_actions(cli._data_parser())
    assert len(actions) >= 8
    for prog, a in actions:
        assert a.help and len(a.help) > 10, (prog, a.option_strings or a.dest)


def test_no_arguments_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([], capsys)
    assert code == EXIT_USAGE and "commands:" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    for argv in (["--version"], ["--version", "bench", "--quick"]):
        code, out, _ = run(argv, capsys)
        assert code == 0 and out.strip() == f"bogc {version('bogc')}"


@pytest.mark.parametrize("argv, word", [(["frobnicate"], "frobnicate"), (["--nope"], "--nope"),
                                        (["data", "explode"], "explode")])
def test_bad_command_line_is_one_line(argv: list[str], word: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, word, "--help")


def test_subcommand_argparse_errors_keep_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["validate", "--no-such-option"], capsys)
    assert code == EXIT_USAGE and "--no-such-option" in err and "Traceback" not in err


# --------------------------------------------------------------------- bad data files
def _bad_files(tmp: Path) -> list[tuple[str, Path, tuple[str, ...]]]:
    """(case, file, words the one-line message must contain)."""
    cases: list[tuple[str, Path, tuple[str, ...]]] = []

    def npz(case: str, words: tuple[str, ...], **changes: np.ndarray | None) -> None:
        arrays = good_arrays()
        for k, v in changes.items():
            if v is None:
                arrays.pop(k)
            else:
                arrays[k] = v
        path = tmp / f"{case}.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        cases.append((case, path, words))

    n = 30
    objects = np.empty(n, dtype=object)
    objects[:] = [{"a": i} for i in range(n)]
    npz("object_features", ("x_a", "pickled", "numeric"), x_a=objects)
    npz("object_labels", ("y", "pickled"), y=objects)
    npz("complex", ("x_b", "complex", "real"), x_b=np.ones((n, 2)) + 1j)
    npz("nan", ("x_a", "NaN"), x_a=np.full((n, 4), np.nan))
    npz("inf", ("x_a", "infinity"), x_a=np.full((n, 4), -np.inf))
    npz("too_big_for_float32", ("x_a", "float32"), x_a=np.full((n, 4), 1e300))
    npz("mismatched_rows", ("x_b", "31", "30"), x_b=np.ones((31, 3)))
    npz("no_features", ("x_a", "no features"), x_a=np.ones((n, 0)))
    npz("string_features", ("x_a", "numeric"), x_a=np.array(["a"] * n))
    npz("fractional_labels", ("y", "whole"), y=np.linspace(0, 1, n))
    npz("one_class", ("y", "two classes"), y=np.zeros(n, dtype=int))
    npz("no_labels", ("'y'",), y=None)
    npz("no_modalities", ("x_<modality>",), x_a=None, x_b=None)
    npz("mask_not_bool", ("test_mask", "boolean"), test_mask=np.ones(n))
    npz("mask_all_test", ("test_mask", "some but not all"), test_mask=np.ones(n, dtype=bool))
    # six rows, two classes: today the validation carve leaves no training row
    npz("tiny", ("y", "training rows", str(MIN_TRAIN_PER_CLASS)),
        y=np.array([0, 0, 0, 1, 1, 1]), x_a=np.ones((6, 4)), x_b=np.ones((6, 2)))
    mask = np.zeros(n, dtype=bool)
    mask[:10] = True  # every row of class 0 is a test row
    npz("class_without_training_rows", ("test_mask", "class 0", "training"), test_mask=mask)
    mask = np.zeros(n, dtype=bool)
    mask[[10, 20]] = True  # class 0 has no test row
    npz("class_without_test_rows", ("test_mask", "class 0", "test"), test_mask=mask)

    text = tmp / "text.npz"
    text.write_text("y,x\n1,2\n")
    cases.append(("text_file", text, ("text.npz", "not a .npz", "numpy.savez")))
    npy = tmp / "single.npz"
    np.save(npy.with_suffix(".npy"), np.ones(3))
    npy.with_suffix(".npy").rename(npy)
    cases.append(("npy_file", npy, ("single.npz", ".npy", "numpy.savez")))
    damaged = tmp / "damaged.npz"
    whole = tmp / "whole.npz"
    np.savez(whole, **good_arrays())
    damaged.write_bytes(whole.read_bytes()[:200])
    cases.append(("damaged", damaged, ("damaged.npz", "damaged",)))
    cases.append(("missing", tmp / "nowhere.npz", ("nowhere.npz", "existing .npz")))
    cases.append(("folder", tmp, ("folder",)))
    return cases


CASES = [
    "object_features", "object_labels", "complex", "nan", "inf", "too_big_for_float32",
    "mismatched_rows", "no_features", "string_features", "fractional_labels", "one_class",
    "no_labels", "no_modalities", "mask_not_bool", "mask_all_test", "tiny",
    "class_without_training_rows", "class_without_test_rows", "text_file", "npy_file",
    "damaged", "missing", "folder",
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, tuple[str, ...]]]:
    tmp = tmp_path_factory.mktemp("bad")
    found = {case: (path, words) for case, path, words in _bad_files(tmp)}
    assert sorted(found) == sorted(CASES)
    return found


@pytest.mark.parametrize("case", CASES)
def test_bad_file_raises_a_named_bogc_error(
    case: str, bad_files: dict[str, tuple[Path, tuple[str, ...]]]
) -> None:
    path, words = bad_files[case]
    with pytest.raises(BOGCError) as info:
        load_dataset(path)
    assert isinstance(info.value, (DataError, ShapeError))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("case", CASES)
def test_bad_file_on_the_command_line_is_one_line(
    case: str, bad_files: dict[str, tuple[Path, tuple[str, ...]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, words = bad_files[case]
    code, out, err = run(["data", "check", str(path)], capsys)
    assert_one_line_error(code, err, *words)
    assert out == ""


@pytest.mark.parametrize("case", ["text_file", "tiny", "object_features", "complex"])
def test_bad_file_given_to_bench_is_one_line(
    case: str, bad_files: dict[str, tuple[Path, tuple[str, ...]]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("torch", reason="bogc bench needs the torch extra")
    path, words = bad_files[case]
    out_dir = tmp_path / "out"
    code, _, err = run(["bench", "--quick", "--no-progress", "--dataset", str(path), "--out",
                        str(out_dir)], capsys)
    assert_one_line_error(code, err, *words)
    assert not (out_dir / "results.json").exists()


def test_the_file_is_only_read(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **good_arrays())
    before = path.read_bytes()
    load_dataset(path)
    assert path.read_bytes() == before


# --------------------------------------------------------------------- good files
def test_string_labels_are_mapped_in_sorted_order(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    arrays = good_arrays(n_classes=3)
    names = np.array(["dog", "cat", "emu"])[arrays["y"]]  # class ids 0,1,2 -> dog,cat,emu
    np.savez(tmp_path / "s.npz", **dict(arrays, y=names))
    d = load_dataset(tmp_path / "s.npz")
    assert d.classes == ("cat", "dog", "emu") and d.n_classes == 3
    np.testing.assert_array_equal(np.array(d.classes)[d.y], names)
    code, out, err = run(["data", "check", str(tmp_path / "s.npz")], capsys)
    assert code == 0 and err == ""
    assert "3 classes" in out and "'cat': 10" in out and "x_b: 6 features" in out


def test_data_check_describes_the_default_split_in_balanced_parentheses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "d.npz", **good_arrays())
    code, out, _ = run(["data", "check", str(tmp_path / "d.npz")], capsys)
    first = out.splitlines()[0]
    assert code == 0 and first.endswith("(no test_mask: a stratified 20% of each class, seed 0)")
    assert first.count("(") == first.count(")") == 1


def test_data_check_summarises_a_long_class_list(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # labels 1..80, six rows each, and label 80 six rows more
    y = np.concatenate([np.repeat(np.arange(1, 81), 6), np.full(6, 80)])
    np.savez(tmp_path / "d.npz", y=y, x_a=np.ones((y.size, 2)))
    code, out, _ = run(["data", "check", str(tmp_path / "d.npz")], capsys)
    line = out.splitlines()[-1]
    assert code == 0 and "'1': 6" not in line and "1: 6" in line
    assert line.count(": 6") == cli._SHOWN_CLASSES  # the first classes one by one
    assert line.endswith("... (30 more classes; every class has 6 to 12 samples)")


def _per_class_loop_mask(y: np.ndarray, frac: float = 0.2) -> np.ndarray:
    """The stratified default split written as the per-class loop it replaces."""
    rng = np.random.default_rng(0)
    mask = np.zeros(y.shape[0], dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        mask[idx[: max(1, int(round(frac * idx.size)))]] = True
    return mask


@pytest.mark.parametrize("seed", range(5))
def test_the_default_split_is_the_per_class_loop_without_its_cost(seed: int) -> None:
    from bogc_core.integrations.data import _default_test_mask

    rng = np.random.default_rng(seed)
    y = rng.integers(0, rng.integers(2, 60), size=rng.integers(10, 2000))
    y = np.unique(y, return_inverse=True)[1].reshape(-1)  # class ids 0..C-1, as the loader has
    np.testing.assert_array_equal(_default_test_mask(y), _per_class_loop_mask(y))


@pytest.mark.parametrize("classes", [10_000, 1_000_000])
def test_sample_ids_stored_as_labels_name_y_before_any_split(
        classes: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # one row per class and no test_mask: the fault is in 'y', found in one pass over it
    path = tmp_path / "ids.npz"
    np.savez(path, y=np.arange(classes), x_a=np.zeros((classes, 1), dtype=np.float32))

    def no_split(y: np.ndarray, frac: float = 0.2) -> np.ndarray:
        raise AssertionError("the split must not be drawn for classes too small for any split")

    monkeypatch.setattr("bogc_core.integrations.data._default_test_mask", no_split)
    code, out, err = run(["data", "check", str(path)], capsys)
    assert_one_line_error(code, err, "y: class 0 has 1 row,", f"{classes} of the {classes} "
                          "classes", "sample ids", "store each row's class label in 'y'")
    assert "test_mask" not in err and out == ""


def test_small_classes_in_y_are_named_with_their_count(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    y = np.concatenate([np.repeat(np.arange(3), 8), [3, 3]])  # class 3 has two rows
    np.savez(tmp_path / "d.npz", y=y, x_a=np.ones((y.size, 2)))
    code, _, err = run(["data", "check", str(tmp_path / "d.npz")], capsys)
    assert_one_line_error(code, err, "y: class 3 has 2 rows", "add samples", "drop them")
    assert "sample ids" not in err


def test_the_smallest_accepted_data_set_loads(tmp_path: Path) -> None:
    per = MIN_TRAIN_PER_CLASS + MIN_TEST_PER_CLASS
    arrays = good_arrays(n_per_class=per, n_classes=2)
    mask = np.zeros(2 * per, dtype=bool)
    mask[[0, per]] = True
    np.savez(tmp_path / "small.npz", **arrays, test_mask=mask)
    d = load_dataset(tmp_path / "small.npz")
    assert np.bincount(d.y[~d.test_mask]).tolist() == [MIN_TRAIN_PER_CLASS] * 2
    # one training row fewer in class 1 is refused
    mask[per + 1] = True
    np.savez(tmp_path / "smaller.npz", **arrays, test_mask=mask)
    with pytest.raises(DataError, match="class 1 has 4 training rows"):
        load_dataset(tmp_path / "smaller.npz")


def test_whole_float_and_bool_labels(tmp_path: Path) -> None:
    arrays = good_arrays(n_classes=2)
    np.savez(tmp_path / "f.npz", **dict(arrays, y=arrays["y"].astype(float) * 3.0))
    np.testing.assert_array_equal(load_dataset(tmp_path / "f.npz").y, arrays["y"])
    np.savez(tmp_path / "b.npz", **dict(arrays, y=arrays["y"].astype(bool)))
    assert load_dataset(tmp_path / "b.npz").classes == (False, True)


# --------------------------------------------------------------------- error sorting
def _raise(exc: BaseException):  # type: ignore[no-untyped-def]
    def runner(argv: list[str]) -> int:
        raise exc

    return runner


def test_a_bug_shows_its_traceback_and_exits_1(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli._RUNNERS, "validate", _raise(KeyError("internal")))
    code, _, err = run(["validate"], capsys)
    assert code == EXIT_BUG
    assert "Traceback" in err and "KeyError: 'internal'" in err and "a bug in bogc" in err


@pytest.mark.parametrize("debug", [["--debug"], []])
def test_debug_shows_the_traceback_of_a_user_error(
    debug: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["data", "check", str(tmp_path / "none.npz"), *debug], capsys)
    assert code == EXIT_USAGE
    assert ("Traceback" in err) == bool(debug)
    assert err.strip().splitlines()[-1].startswith("bogc: error: dataset:")


def test_debug_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BOGC_DEBUG", "1")
    code, _, err = run(["data", "check", str(tmp_path / "none.npz")], capsys)
    assert code == EXIT_USAGE and "Traceback" in err


@pytest.mark.parametrize(
    "exc, words",
    [
        (BOGCError("seeds: must be >= 1\n got 0; pass a positive count"), ("seeds:", "got 0")),
        (FileNotFoundError(2, "No such file or directory", "/no/such/out"), ("/no/such/out",)),
        (PermissionError(13, "Permission denied", "/root/x"), ("/root/x", "Permission denied")),
        (OSError(28, "No space left on device"), ("bench:", "No space left")),
        (MemoryError(), ("out of memory",)),
    ],
)
def test_user_errors_are_one_line(exc: BaseException, words: tuple[str, ...],
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli._RUNNERS, "bench", _raise(exc))
    code, _, err = run(["bench"], capsys)
    assert_one_line_error(code, err, *words)


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli._RUNNERS, "bench", _raise(KeyboardInterrupt()))
    code, _, err = run(["bench"], capsys)
    assert code == 130 and err.strip() == "bogc: interrupted"


def test_missing_internal_module_is_a_bug(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    exc = ModuleNotFoundError("No module named 'bogc_core.nothing'", name="bogc_core.nothing")
    monkeypatch.setitem(cli._RUNNERS, "bench", _raise(exc))
    code, _, err = run(["bench"], capsys)
    assert code == EXIT_BUG and "Traceback" in err


def test_bench_without_torch_names_the_extras(tmp_path: Path) -> None:
    # A fresh interpreter in which `import torch` fails as on an install without the extra.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from bogc_core.integrations.cli import main\n"
        f"sys.exit(main(['bench', '--quick', '--out', {str(tmp_path / 'o')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "'torch'",
                          'pip install "bogc[torch,bench]"')
    assert proc.stdout == ""


def test_missing_optional_package_names_its_extra(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    exc = ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib.pyplot")
    monkeypatch.setitem(cli._RUNNERS, "bench", _raise(exc))
    code, _, err = run(["bench"], capsys)
    assert_one_line_error(code, err, "'matplotlib'", 'pip install "bogc[torch,bench]"')
    exc = ModuleNotFoundError("No module named 'jax'", name="jax")
    monkeypatch.setitem(cli._RUNNERS, "validate", _raise(exc))
    code, _, err = run(["validate"], capsys)
    assert_one_line_error(code, err, 'pip install "bogc[jax]"')


# --------------------------------------------------------------------- data convert
def test_data_convert_forwards_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType(cli._CONVERT_MODULE)
    fake.main = lambda argv: seen.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, cli._CONVERT_MODULE, fake)
    assert main(["data", "convert", "--what", "scene15", "in.mat"]) == 0
    assert seen == [["--what", "scene15", "in.mat"]]


def test_data_convert_errors_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    fake = types.ModuleType(cli._CONVERT_MODULE)

    def bad(argv: list[str]) -> int:
        raise DataError("src: 'x.mat' has no variable 'fea'; pass the PIE file")

    fake.main = bad  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, cli._CONVERT_MODULE, fake)
    code, _, err = run(["data", "convert", "x.mat"], capsys)
    assert_one_line_error(code, err, "src:", "fea")


def test_data_convert_without_the_converter_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_CONVERT_MODULE", "bogc_core.integrations.data.no_such_converter")
    code, _, err = run(["data", "convert", "x.mat"], capsys)
    assert_one_line_error(code, err, "data convert", "no converter")


def test_validate_is_forwarded(monkeypatch: pytest.MonkeyPatch) -> None:
    import bogc_core.validate as validate

    seen: list[list[str]] = []
    monkeypatch.setattr(validate, "main", lambda argv: seen.append(list(argv)) or 1)
    assert main(["--debug", "validate", "--dtype", "both"]) == 1
    assert seen == [["--dtype", "both"]]


def test_the_installed_command_runs(tmp_path: Path) -> None:
    # The console script `bogc` (pyproject [project.scripts]) and `python -m` reach main().
    import shutil

    exe = shutil.which("bogc", path=str(Path(sys.executable).parent))
    assert exe is not None, "the bogc console script is not installed next to this Python"
    bad = tmp_path / "bad.npz"
    bad.write_text("not an archive")
    for cmd in ([exe], [sys.executable, "-m", "bogc_core.integrations.cli"]):
        ok = subprocess.run([*cmd, "data", "check", "mfeat"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
        assert ok.returncode == 0 and "10 classes" in ok.stdout, ok.stderr
        proc = subprocess.run([*cmd, "data", "check", str(bad)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert_one_line_error(proc.returncode, proc.stderr, "bad.npz", "not a .npz")
