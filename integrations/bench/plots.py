"""The figures of ``bogc bench``: test-accuracy curves and BOGC's diagnostics per epoch.

:func:`plot` reads one ``results.json`` document (``doc["methods"][name]`` with
``test_curve_mean``, one value per epoch, ``accuracies`` per seed and, for
BOGC, ``diagnostics_curve_mean``) and writes two PNG files:

- ``accuracy_curves.png``: mean test accuracy per epoch, main methods in one
  panel and BOGC's ablations (with ``sum`` and ``bogc``) in another. The
  y-axis spans the data, the first epochs included; a second row zooms on the
  later epochs when they span less than half of it. A point is the mean over
  the seeds still training at that epoch: solid while every seed runs, dashed
  after early stopping has ended some. Methods whose results
  are identical (same curve and same per-seed accuracies, e.g. ``bogc_tuned``
  when tuning chose the default) are drawn once, labelled ``bogc = bogc_tuned``,
  with a note under the panel.
- ``bogc_diagnostics.png``: BOGC's mean weight per source and the mean fused
  uncertainty :math:`\\prod_k u_k` per epoch (the epoch's sampled diagnostics
  steps; the bench samples the first step of every epoch), markers on the
  epochs that have a point.

Colours are a fixed function of the method (or source) name, so a method keeps
its colour across runs, data sets and method lists. Epoch ticks are integers.
Only matplotlib is needed (the ``bench`` extra).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot",
    "accuracy_figure",
    "diagnostics_figure",
    "color_of",
    "identical_groups",
    "ACCURACY_PNG",
    "DIAGNOSTICS_PNG",
]

ACCURACY_PNG = "accuracy_curves.png"
DIAGNOSTICS_PNG = "bogc_diagnostics.png"

# Hand-picked colours for the methods the benchmark ships (tab10 and tab20
# shades); any other name gets a colour from its CRC-32, stable across runs.
_FIXED = {
    "sum": "#000000",
    "uniform": "#7f7f7f",
    "inverse_variance": "#8c564b",
    "bogc": "#d62728",
    "bogc_tuned": "#ff9896",
    "pcgrad": "#1f77b4",
    "mgda": "#2ca02c",
    "mmpareto": "#9467bd",
    "ogm_ge": "#ff7f0e",
    "bogc_precision": "#17becf",
    "bogc_w_uniform": "#bcbd22",
    "bogc_w_dempster": "#e377c2",
    "bogc_scale_none": "#aec7e8",
    "bogc_gamma0.25": "#ffbb78",
    "bogc_gamma1": "#98df8a",
    "bogc_gamma2": "#c5b0d5",
    "bogc_scope_global": "#c49c94",
    "bogc_per_example": "#f7b6d2",
    "bogc_laplace": "#dbdb8d",
    "bogc_steps": "#9edae5",
    # sources of the diagnostics panel
    "fusion": "#000000",
}
_SPARE = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#31a354",
          "#756bb1", "#636363", "#e6550d", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8")
_BOLD = ("sum", "bogc")


def color_of(name: str) -> str:
    """The colour of a method or source: fixed for shipped names, else from ``crc32(name)``."""
    if name in _FIXED:
        return _FIXED[name]
    return _SPARE[zlib.crc32(name.encode("utf-8")) % len(_SPARE)]


def _signature(entry: dict[str, Any]) -> tuple[Any, ...]:
    return (tuple(entry.get("test_curve_mean") or ()), tuple(entry.get("accuracies") or ()),
            tuple(entry.get("macro_f1s") or ()))


def identical_groups(methods: dict[str, dict[str, Any]], names: Sequence[str]) -> list[list[str]]:
    """``names`` grouped by identical results (curve, per-seed accuracies and macro-F1s).

    Groups come in the order of their first member in ``names``; inside a group
    the shipped methods come first in their usual order (``bogc`` before
    ``bogc_tuned``), then other names alphabetically, so the name drawn and
    the label do not depend on the order of the document. Methods without a
    curve are left out.
    """
    rank = {n: i for i, n in enumerate(_FIXED)}
    groups: dict[tuple[Any, ...], list[str]] = {}
    for n in names:
        e = methods.get(n)
        if not e or not e.get("test_curve_mean"):
            continue
        groups.setdefault(_signature(e), []).append(n)
    return [sorted(g, key=lambda n: (rank.get(n, len(rank)), n)) for g in groups.values()]


def _integer_epochs(ax: Any, n_epochs: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.8, max(n_epochs, 1) + 0.2)


def _values(curve: Sequence[Any] | None) -> list[float]:
    """A stored curve as floats, a missing point (``None`` in strict JSON, or NaN) as NaN."""
    return [math.nan if v is None else float(v) for v in curve or ()]


def _present(curve: Sequence[float]) -> tuple[list[int], list[float]]:
    """Epochs (1-based) and values of the finite points of ``curve``."""
    pts = [(i + 1, v) for i, v in enumerate(curve) if math.isfinite(v)]
    return [x for x, _ in pts], [v for _, v in pts]


def _limits(lo: float, hi: float) -> tuple[float, float]:
    """The y-range of ``[lo, hi]`` (percent) with a margin, at least 1 pp tall."""
    pad = 0.06 * max(hi - lo, 1.0)
    return max(lo - pad, 0.0 - 0.5), min(hi + pad, 100.5)


def accuracy_figure(doc: dict[str, Any]) -> Figure:
    """The figure of ``accuracy_curves.png`` (the caller saves and closes it).

    Top row: every epoch, the y-axis spanning the data. Bottom row, when it is
    less than half as tall: the second half of each curve, zoomed to its range.
    A point is the mean over the seeds still training at that epoch: solid
    while every seed runs, dashed once early stopping has ended some of them
    (``curve_seeds`` of the document gives the count per epoch).
    """
    import matplotlib.pyplot as plt

    methods: dict[str, dict[str, Any]] = doc["methods"]
    main = [n for n in methods if not n.startswith("bogc_") or n == "bogc_tuned"]
    ablations = [n for n in methods if n not in main]
    panels = [("main methods", main)]
    if ablations:
        anchor = [n for n in ("sum", "bogc") if n in methods]
        panels.append(("BOGC ablations (with sum and bogc)", anchor + ablations))
    what = "all modalities present" if doc.get("setting") == "missing" else "mean over seeds"
    # per panel: (label, colour, bold, curve, epochs every seed ran, seeds)
    drawn: list[list[tuple[str, str, bool, list[float], int, int]]] = []
    notes: list[list[str]] = []
    for _, names in panels:
        rows, panel_notes = [], []
        for group in identical_groups(methods, names):
            e = methods[group[0]]
            curve = [100.0 * v for v in _values(e["test_curve_mean"])]
            if not _present(curve)[0]:
                continue
            counts = [int(c) for c in e.get("curve_seeds") or ()]
            seeds = max(counts, default=0)
            together = next((i for i, c in enumerate(counts) if c < seeds), len(curve))
            label = " = ".join(group)
            if len(group) > 1:
                panel_notes.append(f"{label}: identical results, drawn once")
            rows.append((label, color_of(group[0]), any(n in _BOLD for n in group), curve,
                         together, seeds))
        if any(t < len(c) for _, _, _, c, t, _ in rows):
            seeds = max(r[5] for r in rows)
            panel_notes.append(f"solid: mean over all {seeds} seeds; dashed: mean over the seeds "
                               f"still training (early stopping ended the others)")
        drawn.append(rows)
        notes.append(panel_notes)
    # the zoom: each curve from the middle of its run on
    values = [v for rows in drawn for r in rows for v in _present(r[3])[1]]
    tails = [v for rows in drawn for r in rows for v in _present(r[3][len(r[3]) // 2:])[1]]
    zoom = bool(values) and (max(values) - min(tails)) < 0.5 * (max(values) - min(values))
    first_zoomed = min((len(r[3]) // 2 + 1 for rows in drawn for r in rows), default=1)
    n_rows = 2 if zoom else 1
    fig, axes = plt.subplots(n_rows, len(panels), figsize=(6.5 * len(panels), 4.6 * n_rows),
                             squeeze=False)
    for col, ((title, _), rows, panel_notes) in enumerate(zip(panels, drawn, notes)):
        n_epochs = max((len(r[3]) for r in rows), default=1)
        for row in range(n_rows):
            ax = axes[row][col]
            for label, colour, bold, curve, together, _ in rows:
                lw, marker = (2.4 if bold else 1.3), ("o" if len(curve) < 12 else None)
                x, y = _present(curve)
                solid = [i for i, e in enumerate(x) if e <= together]
                ax.plot([x[i] for i in solid], [y[i] for i in solid], label=label, color=colour,
                        lw=lw, marker=marker, ms=3)
                if together < len(curve):  # from the last epoch every seed ran
                    rest = [i for i, e in enumerate(x) if e >= together]
                    ax.plot([x[i] for i in rest], [y[i] for i in rest], color=colour, lw=lw,
                            ls="--", marker=marker, ms=3)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"test accuracy (%), {what}")
            ax.grid(alpha=0.3)
            name = f"{doc.get('dataset', '?')} / {doc.get('setting', '?')}: {title}"
            if row == 0:
                ax.set_title(name, fontsize=10)
                _integer_epochs(ax, n_epochs)
                if values:
                    ax.set_ylim(*_limits(min(values), max(values)))
            else:
                ax.set_title(f"{name}, zoom from epoch {first_zoomed}", fontsize=10)
                _integer_epochs(ax, n_epochs)
                ax.set_xlim(first_zoomed - 0.2, max(n_epochs, first_zoomed) + 0.2)
                ax.set_ylim(*_limits(min(tails), max(values)))
            if rows:
                ax.legend(fontsize=7, ncol=2, loc="lower right")
            else:
                ax.text(0.5, 0.5, "no accuracy curves in this run", ha="center",
                        transform=ax.transAxes)
        if panel_notes:
            axes[-1][col].text(0.0, -0.16, "\n".join(panel_notes),
                               transform=axes[-1][col].transAxes, fontsize=7, va="top", ha="left")
    fig.tight_layout()
    return fig


def _bogc_entry(methods: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    def has_weights(e: dict[str, Any]) -> bool:
        return any(k.startswith("weight/") for k in e.get("diagnostics_curve_mean") or {})

    if "bogc" in methods and has_weights(methods["bogc"]):
        return "bogc", methods["bogc"]
    return next(((n, e) for n, e in methods.items() if has_weights(e)), None)


def diagnostics_figure(doc: dict[str, Any]) -> Figure:
    """The figure of ``bogc_diagnostics.png`` (the caller saves and closes it).

    Each epoch's point is the mean over its sampled diagnostics steps and over
    seeds; an epoch without one (``None`` or NaN) is left out, and markers show
    which epochs have a point.
    """
    import matplotlib.pyplot as plt

    found = _bogc_entry(doc["methods"])
    name, curves = (found[0], found[1]["diagnostics_curve_mean"]) if found else ("bogc", {})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    n_epochs = max((len(v) for v in curves.values()), default=1)

    def draw(ax: Any, curve: Sequence[Any], **kw: Any) -> bool:
        x, y = _present(_values(curve))
        ax.plot(x, y, marker="o" if len(x) < 40 else None, ms=3, **kw)
        return bool(x)

    drawn = {a1: False, a2: False}
    for k, v in sorted(curves.items()):
        if k.startswith("weight/"):
            source = k.split("/", 1)[1]
            drawn[a1] |= draw(a1, v, label=source, color=color_of(source))
    a1.set_xlabel("epoch")
    a1.set_ylabel(r"mean weight $w_k$ over the dimensions reached")
    a1.set_title(f"per-source mean weight ({name})")
    if "uncertainty" in curves:
        drawn[a2] = draw(a2, curves["uncertainty"], color="k")
    a2.set_xlabel("epoch")
    a2.set_ylabel(r"mean fused uncertainty $\prod_k u_k$")
    a2.set_title(f"fused uncertainty ({name})")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        _integer_epochs(a, n_epochs)
        if not drawn[a]:
            a.text(0.5, 0.5, "no sampled diagnostics" if curves else "bogc not run",
                   ha="center", transform=a.transAxes)
    if drawn[a1]:
        a1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(doc: dict[str, Any], out: Path) -> list[str]:
    """Write ``accuracy_curves.png`` and ``bogc_diagnostics.png`` into ``out``; return their paths.

    ``doc`` is a ``results.json`` document; ``out`` is created if missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in ((ACCURACY_PNG, accuracy_figure), (DIAGNOSTICS_PNG, diagnostics_figure)):
        fig = draw(doc)
        try:
            path = out / name
            # bbox "tight" keeps the notes under the panels inside the image
            fig.savefig(path, dpi=110, bbox_inches="tight")
        finally:
            plt.close(fig)
        written.append(str(path))
    return written
