"""Plots of one ``results.json`` document: accuracy curves and BOGC's diagnostics."""

from __future__ import annotations

from pathlib import Path


def plot(doc: dict, out: Path) -> list[str]:
    """Write ``accuracy_curves.png`` and ``bogc_diagnostics.png``; return their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves_by = {n: e.get("test_curve_mean") or [] for n, e in doc["methods"].items()}
    main = [n for n in curves_by if not n.startswith("bogc_") or n == "bogc_tuned"]
    abl = [n for n in curves_by if n not in main]
    groups = [("main methods", main)] + ([("BOGC ablations (with sum and bogc)", ["sum", "bogc"] + abl)]
                                         if abl else [])
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    what = "all modalities present" if doc["setting"] == "missing" else "mean over seeds"
    for ax, (title, names) in zip(axes[0], groups):
        for i, n in enumerate(names):
            c = curves_by.get(n) or []
            if c:
                ax.plot(range(1, len(c) + 1), [100 * v for v in c], label=n, color=cmap(i % 20),
                        lw=2.4 if n in ("sum", "bogc") else 1.2,
                        ls="-" if n in ("sum", "bogc") or i % 2 == 0 else "--")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"test accuracy (%), {what}")
        ax.set_title(f"{doc['dataset']} / {doc['setting']}: {title}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        # the interesting part is the end of training: zoom on the upper range
        finals = [100 * curves_by[n][-1] for n in names if curves_by.get(n)]
        if finals:
            ax.set_ylim(max(0.0, min(finals) - 15), min(100.5, max(finals) + 3))
    fig.tight_layout()
    fig.savefig(out / "accuracy_curves.png", dpi=110)
    plt.close(fig)
    written.append("accuracy_curves.png")

    bogc = doc["methods"].get("bogc") or next(
        (e for n, e in doc["methods"].items() if "diagnostics_curve_mean" in e
         and any(k.startswith("weight/") for k in e["diagnostics_curve_mean"])), None)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    curves = (bogc or {}).get("diagnostics_curve_mean", {})
    for k, v in curves.items():
        if k.startswith("weight/"):
            a1.plot(range(1, len(v) + 1), v, label=k.split("/", 1)[1])
    a1.set_xlabel("epoch")
    a1.set_ylabel("mean BOGC weight over the dimensions it reaches")
    a1.set_title("per-source mean weight (bogc)")
    a1.grid(alpha=0.3)
    if curves:
        a1.legend(fontsize=7)
    if "uncertainty" in curves:
        v = curves["uncertainty"]
        a2.plot(range(1, len(v) + 1), v, color="k")
    a2.set_xlabel("epoch")
    a2.set_ylabel("mean fused uncertainty prod_k u_k")
    a2.set_title("fused uncertainty (bogc)")
    a2.grid(alpha=0.3)
    if not curves:
        for a in (a1, a2):
            a.text(0.5, 0.5, "bogc not run", ha="center", transform=a.transAxes)
    fig.tight_layout()
    fig.savefig(out / "bogc_diagnostics.png", dpi=110)
    plt.close(fig)
    written.append("bogc_diagnostics.png")
    return written
