"""The figures of ``bogc bench`` from a synthetic ``results.json`` document."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib", reason="the plots need the bench extra (matplotlib)")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from bogc_core.integrations.bench import plots  # noqa: E402


def _entry(curve: list[float], accs: list[float], diag: bool = False) -> dict[str, Any]:
    e: dict[str, Any] = {"test_curve_mean": curve, "accuracies": accs, "macro_f1s": accs,
                         "accuracy_mean": sum(accs) / len(accs)}
    if diag:
        e["diagnostics_curve_mean"] = {
            "weight/fusion": [0.5, 0.6, 0.62], "weight/audio": [0.3, 0.25, 0.2],
            "weight/image": [0.2, 0.15, 0.18], "uncertainty": [0.1, 0.05, 0.04],
        }
    return e


def _doc(order: list[str]) -> dict[str, Any]:
    same = _entry([0.12, 0.8, 0.95], [0.95, 0.96], diag=True)
    methods = {
        "sum": _entry([0.30, 0.85, 0.94], [0.94, 0.95]),
        "bogc": same,
        "bogc_tuned": dict(same),
        "pcgrad": _entry([0.25, 0.83, 0.93], [0.93, 0.94]),
        "my_method": _entry([0.4, 0.7, 0.9], [0.9, 0.91]),
        "bogc_gamma2": _entry([0.2, 0.86, 0.96], [0.96, 0.95]),
    }
    return {"dataset": "toy", "setting": "standard", "epochs": 3,
            "methods": {n: methods[n] for n in order}}


ORDER_A = ["sum", "bogc", "bogc_tuned", "pcgrad", "my_method", "bogc_gamma2"]
ORDER_B = ["my_method", "pcgrad", "bogc_gamma2", "bogc_tuned", "sum", "bogc"]


def _lines(fig: Any) -> dict[tuple[int, str], Any]:
    return {(i, line.get_label()): line for i, ax in enumerate(fig.axes)
            for line in ax.get_lines()}


def test_plot_writes_both_pngs_and_returns_their_paths(tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder"
    paths = plots.plot(_doc(ORDER_A), out)
    assert paths == [str(out / "accuracy_curves.png"), str(out / "bogc_diagnostics.png")]
    for p in paths:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_identical_methods_are_drawn_once_with_a_note() -> None:
    fig = plots.accuracy_figure(_doc(ORDER_A))
    try:
        labels = [line.get_label() for line in fig.axes[0].get_lines()]
        assert labels == ["sum", "bogc = bogc_tuned", "pcgrad", "my_method"]
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any("bogc = bogc_tuned: identical results" in t for t in texts)
        # the ablation panel carries sum and bogc as anchors
        assert [line.get_label() for line in fig.axes[1].get_lines()] == [
            "sum", "bogc", "bogc_gamma2"]
    finally:
        plt.close(fig)


def test_identical_groups_need_equal_curves_and_seeds() -> None:
    doc = _doc(ORDER_A)
    doc["methods"]["bogc_tuned"] = dict(doc["methods"]["bogc"], accuracies=[0.95, 0.97])
    assert plots.identical_groups(doc["methods"], ORDER_A) == [[n] for n in ORDER_A]
    doc["methods"]["pcgrad"] = dict(doc["methods"]["sum"])
    assert ["sum", "pcgrad"] in plots.identical_groups(doc["methods"], ORDER_A)


def test_colours_are_fixed_per_method_whatever_the_order() -> None:
    fig_a, fig_b = plots.accuracy_figure(_doc(ORDER_A)), plots.accuracy_figure(_doc(ORDER_B))
    try:
        la, lb = _lines(fig_a), _lines(fig_b)
        assert set(la) == set(lb)
        for key in la:
            assert la[key].get_color() == lb[key].get_color(), key
        colours = [la[(0, n)].get_color() for n in ("sum", "bogc = bogc_tuned", "pcgrad",
                                                     "my_method")]
        assert len(set(colours)) == 4
    finally:
        plt.close(fig_a)
        plt.close(fig_b)
    assert plots.color_of("bogc") == plots.color_of("bogc")
    assert plots.color_of("my_method") == plots.color_of("my_method")
    # an unknown name's colour comes from its name only: the same in a fresh process
    import subprocess
    import sys

    code = ("import zlib; from pathlib import Path; import importlib.util as u; "
            f"s = u.spec_from_file_location('p', {plots.__file__!r}); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); print(m.color_of('my_method'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert proc.stdout.strip() == plots.color_of("my_method"), proc.stderr


def _visible(ax: Any) -> list[float]:
    """The y-values of the points drawn inside the x-range of ``ax``."""
    x0, x1 = ax.get_xlim()
    return [float(y) for line in ax.get_lines()
            for x, y in zip(line.get_xdata(), line.get_ydata()) if x0 <= x <= x1]


def test_y_axis_spans_the_data_and_a_zoom_row_shows_the_later_epochs() -> None:
    doc = _doc(ORDER_A)
    fig = plots.accuracy_figure(doc)
    try:
        assert len(fig.axes) == 4  # two panels (main, ablations), all epochs and the zoom
        top, zoom = fig.axes[:2], fig.axes[2:]
        every = [100 * v for e in doc["methods"].values() for v in e["test_curve_mean"]]
        for ax in top:
            lo, hi = ax.get_ylim()
            # the data range of the figure with a margin: every point, the first epoch included
            assert min(every) - 10.0 < lo < min(every) and max(every) < hi <= 100.5
        # the zoom row: the second half of every curve (epochs 2 and 3 of 3) fills it
        tails = [100 * v for e in doc["methods"].values() for v in e["test_curve_mean"][1:]]
        for ax, full in zip(zoom, top):
            lo, hi = ax.get_ylim()
            assert ax.get_xlim()[0] > 1.0 and lo < 70.0 and hi > 96.0
            assert hi - lo < 0.5 * (full.get_ylim()[1] - full.get_ylim()[0])
            assert all(lo <= y <= hi for y in _visible(ax))
        assert min(tails) == pytest.approx(70.0)
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_a_narrow_plateau_is_readable() -> None:
    # the case: every method between 97 and 98 % after a first epoch at 40 %
    methods = {n: _entry([0.40, 0.970 + i / 1000, 0.972 + i / 1000, 0.975 + i / 1000,
                          0.978 + i / 2000], [0.97, 0.98]) for i, n in enumerate(
                              ["sum", "bogc", "pcgrad"])}
    fig = plots.accuracy_figure({"dataset": "toy", "setting": "standard", "methods": methods})
    try:
        lo, hi = fig.axes[1].get_ylim()  # the zoom of the one panel, epochs 3 to 5
        assert fig.axes[1].get_xlim()[0] == pytest.approx(2.8)
        assert 97.0 < lo < 97.2 and 97.9 < hi < 98.0
    finally:
        plt.close(fig)


def test_curves_of_seeds_that_stop_early_are_dashed_and_explained() -> None:
    doc = _doc(["sum", "pcgrad"])
    doc["methods"]["sum"]["test_curve_mean"] = [0.30, 0.85, 0.94, 0.95]
    doc["methods"]["sum"]["curve_seeds"] = [2, 2, 1, 1]  # one seed stopped after epoch 2
    doc["methods"]["pcgrad"]["curve_seeds"] = [2, 2, 2]
    fig = plots.accuracy_figure(doc)
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        solid = [line for line in lines if line.get_linestyle() == "-"]
        dashed = [line for line in lines if line.get_linestyle() == "--"]
        assert [line.get_label() for line in solid] == ["sum", "pcgrad"]
        assert list(solid[0].get_xdata()) == [1, 2] and list(solid[1].get_xdata()) == [1, 2, 3]
        # the dashed part starts at the last epoch every seed ran, in the method's colour
        assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [2, 3, 4]
        assert dashed[0].get_color() == solid[0].get_color()
        texts = " ".join(t.get_text() for a in fig.axes for t in a.texts)
        assert "mean over all 2 seeds" in texts and "seeds still training" in texts
    finally:
        plt.close(fig)


def test_diagnostics_use_math_text_and_source_colours() -> None:
    fig = plots.diagnostics_figure(_doc(ORDER_B))
    try:
        assert r"$\prod_k u_k$" in fig.axes[1].get_ylabel()
        lines = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
        assert set(lines) == {"fusion", "audio", "image"}
        assert lines == {n: plots.color_of(n) for n in lines}
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert all(float(t).is_integer() for t in ticks)
    finally:
        plt.close(fig)


def test_diagnostics_draw_every_present_epoch_and_skip_missing_ones() -> None:
    doc = _doc(ORDER_A)
    nan = float("nan")
    # epoch 2 was never sampled: NaN in memory, null (None) in strict JSON
    doc["methods"]["bogc"]["diagnostics_curve_mean"] = {
        "weight/fusion": [0.5, nan, 0.62], "weight/audio": [0.3, None, 0.2],
        "uncertainty": [0.1, nan, 0.04]}
    fig = plots.diagnostics_figure(doc)
    try:
        for ax in fig.axes:
            for line in ax.get_lines():
                assert list(line.get_xdata()) == [1, 3]  # the present points only
                assert line.get_marker() == "o"  # a lone point is visible too
                assert all(math.isfinite(v) for v in line.get_ydata())
    finally:
        plt.close(fig)


def test_a_doc_without_bogc_or_curves_still_plots(tmp_path: Path) -> None:
    doc = {"dataset": "toy", "setting": "missing",
           "methods": {"sum": {"test_curve_mean": [], "accuracies": [0.5]}}}
    paths = plots.plot(doc, tmp_path)
    assert all(Path(p).is_file() for p in paths)
