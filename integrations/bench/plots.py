"""The figures of ``bogc bench``: test-accuracy curves and BOGC's diagnostics per epoch.

:func:`plot` reads one ``results.json`` document (``doc["methods"][name]`` with
``test_curve_mean``, one value per epoch, ``accuracies`` per seed and, for
BOGC, ``diagnostics_curve_mean``) and writes two PNG files:

- ``accuracy_curves.png``: mean test accuracy per epoch, main methods in one
  panel and BOGC's ablations (with ``sum`` and ``bogc``) in another. The
  y-axis spans every point, the first epochs included. Methods whose results
  are identical (same curve and same per-seed accuracies, e.g. ``bogc_tuned``
  when tuning chose the default) are drawn once, labelled ``bogc = bogc_tuned``,
  with a note under the panel.
- ``bogc_diagnostics.png``: BOGC's mean weight per source and the mean fused
  uncertainty :math:`\\prod_k u_k` per epoch.

Colours are a fixed function of the method (or source) name, so a method keeps
its colour across runs, data sets and method lists. Epoch ticks are integers.
Only matplotlib is needed (the ``bench`` extra).
"""

from __future__ import annotations

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


def accuracy_figure(doc: dict[str, Any]) -> Figure:
    """The figure of ``accuracy_curves.png`` (the caller saves and closes it)."""
    import matplotlib.pyplot as plt

    methods: dict[str, dict[str, Any]] = doc["methods"]
    main = [n for n in methods if not n.startswith("bogc_") or n == "bogc_tuned"]
    ablations = [n for n in methods if n not in main]
    panels = [("main methods", main)]
    if ablations:
        anchor = [n for n in ("sum", "bogc") if n in methods]
        panels.append(("BOGC ablations (with sum and bogc)", anchor + ablations))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.0), squeeze=False)
    what = "all modalities present" if doc.get("setting") == "missing" else "mean over seeds"
    for ax, (title, names) in zip(axes[0], panels):
        notes, lows, n_epochs = [], [], 1
        for group in identical_groups(methods, names):
            first = group[0]
            curve = [100.0 * v for v in methods[first]["test_curve_mean"]]
            lows.append(min(curve))
            n_epochs = max(n_epochs, len(curve))
            label = " = ".join(group)
            if len(group) > 1:
                notes.append(f"{label}: identical results, drawn once")
            bold = any(n in _BOLD for n in group)
            ax.plot(range(1, len(curve) + 1), curve, label=label, color=color_of(first),
                    lw=2.4 if bold else 1.3, marker="o" if len(curve) < 12 else None, ms=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"test accuracy (%), {what}")
        ax.set_title(f"{doc.get('dataset', '?')} / {doc.get('setting', '?')}: {title}", fontsize=10)
        ax.grid(alpha=0.3)
        _integer_epochs(ax, n_epochs)
        # every point visible, the first epochs included
        low = min(lows) if lows else 0.0
        ax.set_ylim(max(0.0, low - 0.05 * (100.0 - low) - 1.0), 100.5)
        if lows:
            ax.legend(fontsize=7, ncol=2, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no accuracy curves in this run", ha="center",
                    transform=ax.transAxes)
        if notes:
            ax.text(0.0, -0.16, "\n".join(notes), transform=ax.transAxes, fontsize=7,
                    va="top", ha="left")
    fig.tight_layout()
    return fig


def _bogc_entry(methods: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    def has_weights(e: dict[str, Any]) -> bool:
        return any(k.startswith("weight/") for k in e.get("diagnostics_curve_mean") or {})

    if "bogc" in methods and has_weights(methods["bogc"]):
        return "bogc", methods["bogc"]
    return next(((n, e) for n, e in methods.items() if has_weights(e)), None)


def diagnostics_figure(doc: dict[str, Any]) -> Figure:
    """The figure of ``bogc_diagnostics.png`` (the caller saves and closes it)."""
    import matplotlib.pyplot as plt

    found = _bogc_entry(doc["methods"])
    name, curves = (found[0], found[1]["diagnostics_curve_mean"]) if found else ("bogc", {})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    n_epochs = max((len(v) for v in curves.values()), default=1)
    for k, v in sorted(curves.items()):
        if k.startswith("weight/"):
            source = k.split("/", 1)[1]
            a1.plot(range(1, len(v) + 1), v, label=source, color=color_of(source))
    a1.set_xlabel("epoch")
    a1.set_ylabel(r"mean weight $w_k$ over the dimensions reached")
    a1.set_title(f"per-source mean weight ({name})")
    if "uncertainty" in curves:
        v = curves["uncertainty"]
        a2.plot(range(1, len(v) + 1), v, color="k")
    a2.set_xlabel("epoch")
    a2.set_ylabel(r"mean fused uncertainty $\prod_k u_k$")
    a2.set_title(f"fused uncertainty ({name})")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        _integer_epochs(a, n_epochs)
    if curves:
        a1.legend(fontsize=7)
    else:
        for a in (a1, a2):
            a.text(0.5, 0.5, "bogc not run", ha="center", transform=a.transAxes)
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
