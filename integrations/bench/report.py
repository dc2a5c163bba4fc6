"""``results.json`` documents, text and markdown tables, the summary and the cost plot.

A document is one data set and one setting. ``methods[m]`` holds the
headline numbers (the ``plateau`` result: early stopping on validation);
``fixed_budget[m]`` the same fields after exactly ``fixed_epochs`` epochs.
Every difference to ``sum`` is paired by seed (``paired_difference``: t
interval, t-test p, its Holm adjustment across the table's comparisons, and
``mde``, the minimum detectable effect at 80 % power) and by test example
(``bootstrap``). The mark of a difference (:func:`mark`) follows the printed
t interval alone. :func:`restat` recomputes every t statistic and Holm
adjustment of a document from its stored per-seed accuracies. In the ``missing`` setting,
``methods[m]["missing_rules"][rule][modality]`` holds
``accuracy_mean, accuracy_std, accuracies, accuracy_diff_to_sum``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import example_bootstrap, holm, mean_std, paired_difference
from .protocol import MISSING_RULES, NOT_APPLICABLE

BASELINE = "sum"


def _diff(values: list[float], base: list[float], correct: np.ndarray | None,
          base_correct: np.ndarray | None) -> dict[str, Any]:
    d: dict[str, Any] = paired_difference(values, base)
    if correct is not None and base_correct is not None:
        d["bootstrap"] = example_bootstrap(correct, base_correct)
    return d


def _block(values: list[float], base: list[float] | None, correct=None, base_correct=None) -> dict[str, Any]:
    m, s = mean_std(values)
    out: dict[str, Any] = {"accuracy_mean": m, "accuracy_std": s, "accuracies": [float(v) for v in values]}
    if base is not None:
        out["accuracy_diff_to_sum"] = _diff(values, base, correct, base_correct)
    return out


def _curve_mean(curves: list[list[float]]) -> list[float]:
    """Mean over seeds of curves of unequal length (early stopping): NaN-padded, mean of the present."""
    n = max((len(c) for c in curves), default=0)
    if n == 0:
        return []
    a = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        a[i, : len(c)] = c
    # A column where every curve is NaN (a metric never recorded) stays NaN,
    # without numpy's "Mean of empty slice" warning.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [float(v) for v in np.nanmean(a, axis=0)]


def _curve_seeds(curves: list[list[float]]) -> list[int]:
    """How many of ``curves`` reach each epoch (the count behind each :func:`_curve_mean` point)."""
    n = max((len(c) for c in curves), default=0)
    return [sum(len(c) > i for c in curves) for i in range(n)]


def _holm_table(entries: list[dict[str, Any]]) -> None:
    """Add ``p_holm`` to every ``accuracy_diff_to_sum`` in ``entries`` (one table)."""
    diffs = [e["accuracy_diff_to_sum"] for e in entries if "accuracy_diff_to_sum" in e]
    for d, p in zip(diffs, holm([_num(d["p"]) for d in diffs])):
        d["p_holm"] = p


def _num(x: Any) -> float:
    """A stored number, NaN for ``null`` (strict JSON writes NaN as ``null``)."""
    return math.nan if x is None else float(x)


def _tables(doc: dict) -> list[list[dict[str, Any]]]:
    """The entry lists of a document that share one Holm correction each."""
    out = []
    for table in ("methods", "fixed_budget"):
        methods = doc.get(table, {})
        out.append(list(methods.values()))
        if doc.get("setting") == "missing":
            mods = doc["modalities"]
            for rule in MISSING_RULES:
                out.append([b for n in methods if "missing_rules" in methods[n] for m in mods
                             if (b := methods[n]["missing_rules"][rule][m]) is not None])
    return out


def restat(doc: dict) -> dict:
    """Recompute, in place, every ``accuracy_diff_to_sum`` of ``doc`` (mean, t interval, p,
    mde) from the stored per-seed ``accuracies`` of the entry and of ``sum``, then every
    table's Holm adjustment. The bootstrap (which needs per-example results) is kept."""
    for table in ("methods", "fixed_budget"):
        methods = doc.get(table, {})
        if BASELINE not in methods:
            continue
        base = methods[BASELINE]
        for n, e in methods.items():
            pairs = [(e, base)]
            if "missing_rules" in e and n != BASELINE:
                pairs += [(e["missing_rules"][r][m], base["missing_rules"][r][m])
                          for r in e["missing_rules"] for m in e["missing_rules"][r]]
            for entry, b in pairs:
                if entry is None or b is None or "accuracy_diff_to_sum" not in entry:
                    continue
                fresh = paired_difference(entry["accuracies"], b["accuracies"])
                entry["accuracy_diff_to_sum"].update(fresh)
            if "removed_modality" in e:  # the zero_fill rule under its older name
                e["removed_modality"] = e["missing_rules"]["zero_fill"]
    for entries in _tables(doc):
        _holm_table(entries)
    return doc


def strict(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (numpy scalars to Python)."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def dump_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as strict JSON (``null`` for NaN, never ``NaN`` or ``Infinity``)."""
    Path(path).write_text(json.dumps(strict(obj), indent=1, allow_nan=False))


def _selection(data_modalities: tuple[str, ...], setting: str, runs: dict[str, list[dict]],
               sel: str) -> dict[str, Any]:
    """Per-method entries of one selection (``plateau`` or ``fixed``)."""
    res = {n: [r["results"][sel] for r in rs] for n, rs in runs.items()}
    base: list[dict[str, Any]] = res.get(BASELINE) or []
    methods: dict[str, Any] = {}
    for n, rr in res.items():
        is_base = n == BASELINE or not base
        if setting == "missing":
            per_seed = [[float(np.mean(r["missing_correct"]["zero_fill"][m])) for m in data_modalities]
                        for r in rr]
            accs = [float(np.mean(v)) for v in per_seed]
            b = None if is_base else [float(np.mean([np.mean(r["missing_correct"]["zero_fill"][m])
                                                     for m in data_modalities])) for r in base]
            e = _block(accs, b)
        else:
            accs = [r["accuracy"] for r in rr]
            e = _block(accs, None if is_base else [r["accuracy"] for r in base],
                       np.stack([r["correct"] for r in rr]),
                       None if is_base else np.stack([r["correct"] for r in base]))
        f1m, f1s = mean_std([r["macro_f1"] for r in rr])
        e.update({
            "macro_f1_mean": f1m, "macro_f1_std": f1s, "macro_f1s": [r["macro_f1"] for r in rr],
            "full_accuracy_mean": float(np.mean([r["accuracy"] for r in rr])),
            "unimodal_accuracy": {m: [r["unimodal_accuracy"][m] for r in rr] for m in data_modalities},
            "unimodal_accuracy_mean": {m: float(np.mean([r["unimodal_accuracy"][m] for r in rr]))
                                       for m in data_modalities},
        })
        if setting == "missing":
            rules: dict[str, Any] = {}
            for rule in MISSING_RULES:
                rules[rule] = {}
                for m in data_modalities:
                    if any(r["missing_correct"][rule][m] is None for r in rr):
                        rules[rule][m] = None  # the rule does not apply (NOT_APPLICABLE)
                        continue
                    c = np.stack([r["missing_correct"][rule][m] for r in rr])
                    bc = None if is_base else np.stack([r["missing_correct"][rule][m] for r in base])
                    rules[rule][m] = _block(c.mean(axis=1).tolist(),
                                            None if bc is None else bc.mean(axis=1).tolist(), c, bc)
            e["missing_rules"] = rules
            e["removed_modality"] = rules["zero_fill"]
        methods[n] = e
    return methods


def summarize(dataset: str, modalities: tuple[str, ...], setting: str, runs: dict[str, list[dict]],
              seeds: list[int], train_config: dict, split_info: dict, described: dict,
              tuning: dict, extra: dict) -> dict[str, Any]:
    """The ``results.json`` document for one data set and setting.

    ``runs[m][i]``: the run record(s) of method ``m`` and seed ``seeds[i]``, with
    ``results["plateau"]`` and ``results["fixed"]`` (see :func:`.protocol.train_run`).
    """
    methods = _selection(modalities, setting, runs, "plateau")
    fixed = _selection(modalities, setting, runs, "fixed")
    base_sec = float(np.mean([r["seconds"] for r in runs[BASELINE]])) if BASELINE in runs else math.nan
    for n, rs in runs.items():
        e = methods[n]
        sec = float(np.mean([r["seconds"] for r in rs]))
        epochs = [r["epochs_run"] for r in rs]
        e.update({
            "seconds_per_run": sec,
            "seconds_per_epoch": float(np.mean([r["seconds"] / r["epochs_run"] for r in rs])),
            "seconds_ratio_to_sum": sec / base_sec if base_sec > 0 else math.nan,
            "epochs_run_mean": float(np.mean(epochs)),
            "best_epoch_mean": float(np.mean([r["best_epoch"] for r in rs])),
            "val_accuracy_mean": float(np.mean([r["val_accuracy"]["plateau"] for r in rs])),
            "config": described.get(n, {}),
            "test_curve_mean": _curve_mean([r["test_curve"] for r in rs]),
            # seeds still training at each epoch (early stopping ends some runs sooner)
            "curve_seeds": _curve_seeds([r["test_curve"] for r in rs]),
            "val_curve_mean": _curve_mean([r["val_curve"] for r in rs]),
        })
        diags = [r["diagnostics"] for r in rs]
        keys = sorted({k for d in diags for ep in d for k in ep})
        if keys:
            e["diagnostics_curve_mean"] = {
                k: _curve_mean([[ep.get(k, math.nan) for ep in d] for d in diags]) for k in keys
            }
    doc = {
        "dataset": dataset,
        "setting": setting,
        "modalities": list(modalities),
        "seeds": seeds,
        "epochs": train_config["fixed_epochs"],
        "train_config": train_config,
        "split": split_info,
        "methods": methods,
        "fixed_budget": fixed,
        "tuning": tuning,
    }
    if setting == "missing":
        na = {rule: why for rule, why in NOT_APPLICABLE.items()
              if any(e["missing_rules"][rule][m] is None for e in methods.values()
                     for m in modalities)}
        if na:
            doc["not_applicable"] = na
    doc.update(extra)
    for entries in _tables(doc):
        _holm_table(entries)
    return doc


# ------------------------------------------------------------------ formatting
def pp(x: float) -> str:
    """``x`` in percentage points, signed; a value that rounds to zero prints ``+0.00``."""
    text = f"{100 * x:+.2f}"
    return "+0.00" if text == "-0.00" else text


def counted(n: int, noun: str) -> str:
    """``1 seed``, ``2 seeds``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _cell(block: dict | None, width: int = 0) -> str:
    """A missing-modality accuracy in %, or ``n/a`` where the rule does not apply."""
    text = "n/a" if block is None else f"{100 * block['accuracy_mean']:.2f}"
    return f"{text:>{width}}"


#: the mark of a difference to sum, and what it means (one legend line under every table)
MARKS = {
    "level": "the 95% t interval over seeds covers 0",
    "*": "it excludes 0 and the Holm-adjusted p < 0.05",
    "~": "it excludes 0 but not after Holm's correction across the table",
    "=": "every seed gave the same nonzero difference: a zero-width interval, no t-test "
         "(p and mde null, left out of Holm)",
}


def mark(d: dict) -> str:
    """``level``, ``*``, ``~`` or ``=`` (:data:`MARKS`), decided by the printed t interval
    alone; ``""`` without an interval (fewer than 2 seeds).

    The t interval excludes 0 exactly when the paired t-test's p is below 0.05, so
    ``~`` means the Holm adjustment lifted p to 0.05 or above.
    """
    lo, hi = _num(d.get("ci_low")), _num(d.get("ci_high"))
    if math.isnan(lo) or math.isnan(hi):
        return ""
    if lo <= 0.0 <= hi:
        return "level"
    if lo == hi:
        return "="
    return "*" if _num(d.get("p_holm")) < 0.05 else "~"


def legend(seeds: int | None = None) -> str:
    """The line under every table that explains each mark and ``mde``."""
    over = f"these {counted(seeds, 'seed')}" if seeds else "the table's seeds"
    return ("marks: " + "; ".join(f"{k}: {v}" for k, v in MARKS.items())
            + f". mde: the smallest difference (pp) the paired t-test over {over} "
            "detects with 80% power at alpha 0.05, from the observed spread of the paired "
            "differences; 'level' reads as 'no difference larger than the mde was seen'.")


def diff_text(d: dict | None, bootstrap: bool = True, mde: bool = True) -> str:
    """``+1.23 [+0.10, +2.40] * (mde 1.50)``: the mean, the t interval over seeds (``/ [..]``
    the bootstrap one over test examples, shown but not used for the mark), the mark
    (:func:`mark`) and the minimum detectable effect, all in pp."""
    if not d:
        return "-"
    if math.isnan(_num(d.get("ci_low"))):
        return pp(d["mean"])
    txt = f"{pp(d['mean'])} [{pp(d['ci_low'])}, {pp(d['ci_high'])}]"
    if bootstrap and d.get("bootstrap"):
        b = d["bootstrap"]
        txt += f" / [{pp(b['ci_low'])}, {pp(b['ci_high'])}]"
    m = mark(d)
    if m:
        txt += f" {m}"
    if mde and not math.isnan(_num(d.get("mde"))):
        txt += f" (mde {100 * _num(d['mde']):.2f})"
    return txt


def title(doc: dict) -> str:
    head = f"{doc['dataset']} / {doc['setting']}"
    if doc.get("train_config", {}).get("model", "mlp") != "mlp":
        head += f", {doc['train_config']['model']}"
    if doc["split"].get("shots"):
        head += f" k={doc['split']['shots']}"
    if doc["split"].get("noise_modality"):
        head += f" (noise std {doc['split']['noise_std']} on {doc['split']['noise_modality']})"
    return head


def format_table(doc: dict) -> str:
    """Plain-text table of the headline (early-stopped) and the fixed-budget accuracy, with the
    legend line of the marks (:func:`legend`)."""
    tc = doc["train_config"]
    seeds = counted(len(doc["seeds"]), "seed")
    lines = [f"{title(doc)}, {seeds}; early stopping (patience {tc['patience']}, "
             f"max {counted(tc['max_epochs'], 'epoch')}) and a fixed budget of "
             f"{counted(tc['fixed_epochs'], 'epoch')}",
             f"{'method':<22} {'accuracy':>15} {'diff to sum [95% t CI]':>30} {'mde':>5} "
             f"{'fixed budget':>13} {'diff':>9} {'mde':>5} {'time/sum':>8}"]
    for n, e in doc["methods"].items():
        f = doc["fixed_budget"][n]
        d, fd = e.get("accuracy_diff_to_sum"), f.get("accuracy_diff_to_sum")
        lines.append(
            f"{n:<22} {100 * e['accuracy_mean']:>8.2f} ± {100 * e['accuracy_std']:<4.2f} "
            f"{diff_text(d, bootstrap=False, mde=False):>30} {_mde_text(d):>5} "
            f"{100 * f['accuracy_mean']:>13.2f} "
            f"{(pp(fd['mean']) + ' ' + mark(fd)).strip() if fd else '-':>9} {_mde_text(fd):>5} "
            f"{_num(e['seconds_ratio_to_sum']):>8.2f}")
    if doc["setting"] == "missing":
        mods = doc["modalities"]
        for rule in MISSING_RULES:
            lines.append(f"accuracy with one modality removed, rule {rule}:")
            lines.append(f"{'method':<22} " + " ".join(f"{'-' + m:>10}" for m in mods))
            for n, e in doc["methods"].items():
                lines.append(f"{n:<22} " + " ".join(
                    _cell(e["missing_rules"][rule][m], 10) for m in mods))
        for rule, why in doc.get("not_applicable", {}).items():
            lines.append(f"n/a: rule {rule} does not apply: {why}")
    lines.append(legend(len(doc["seeds"])))
    return "\n".join(lines)


def _mde_text(d: dict | None) -> str:
    v = _num(d.get("mde")) if d else math.nan
    return "-" if math.isnan(v) else f"{100 * v:.2f}"


def markdown_tables(doc: dict) -> list[str]:
    """Markdown lines for one document (headline, fixed budget, imbalance lens, missing rules)."""
    tc = doc["train_config"]
    seeds = counted(len(doc["seeds"]), "seed")
    L = [f"**{title(doc)}**: {seeds}; early stopping on validation (patience "
         f"{tc['patience']}, at most {counted(tc['max_epochs'], 'epoch')}); fixed budget "
         f"{counted(tc['fixed_epochs'], 'epoch')}.", "",
         "| method | accuracy % | diff to sum, pp [95% t over seeds] / [95% bootstrap over test "
         "examples, not used for the mark] mark (mde) | fixed budget % | fixed-budget diff, pp "
         "[95% t] mark (mde) | epochs | time / sum |",
         "|---|---|---|---|---|---|---|"]
    for n, e in doc["methods"].items():
        f = doc["fixed_budget"][n]
        L.append(f"| {n} | {100 * e['accuracy_mean']:.2f} ± {100 * e['accuracy_std']:.2f} | "
                 f"{diff_text(e.get('accuracy_diff_to_sum'))} | "
                 f"{100 * f['accuracy_mean']:.2f} ± {100 * f['accuracy_std']:.2f} | "
                 f"{diff_text(f.get('accuracy_diff_to_sum'), bootstrap=False)} | "
                 f"{e['epochs_run_mean']:.1f} | {_num(e['seconds_ratio_to_sum']):.2f} |")
    L += ["", legend(len(doc["seeds"]))]
    mods = doc["modalities"]
    L += ["", "Imbalance lens: test accuracy % of each modality's own head after joint training:", "",
          "| method | " + " | ".join(mods) + " |", "|---|" + "---|" * len(mods)]
    for n, e in doc["methods"].items():
        L.append(f"| {n} | " + " | ".join(f"{100 * e['unimodal_accuracy_mean'][m]:.2f}"
                                          for m in mods) + " |")
    if doc["setting"] == "missing":
        for rule in MISSING_RULES:
            L += ["", f"Modality removed at test time, rule `{rule}`: accuracy %, and the diff to "
                  "sum in pp [95% t over seeds]:", "",
                  "| method | " + " | ".join(f"without {m}" for m in mods) + " |",
                  "|---|" + "---|" * len(mods)]
            for n, e in doc["methods"].items():
                cells = []
                for m in mods:
                    b = e["missing_rules"][rule][m]
                    d = b.get("accuracy_diff_to_sum") if b is not None else None
                    cells.append(_cell(b) + (f" ({diff_text(d, bootstrap=False)})" if d else ""))
                L.append(f"| {n} | " + " | ".join(cells) + " |")
            if rule in doc.get("not_applicable", {}):
                L += ["", f"n/a: the rule does not apply: {doc['not_applicable'][rule]}."]
    L.append("")
    return L


def is_results_doc(doc: Any) -> bool:
    """True for a document written by this harness (the ``--all`` summary skips anything else)."""
    return (isinstance(doc, dict) and isinstance(doc.get("methods"), dict)
            and isinstance(doc.get("fixed_budget"), dict) and "train_config" in doc
            and isinstance(doc.get("split"), dict))


def write_summary(root: Path, paths: list[Path]) -> Path:
    """Collect the ``results.json`` files ``paths`` (written under ``root``) into ``summary.md``."""
    lines = ["# bogc bench summary", ""]
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text())
        except (OSError, ValueError):
            continue
        if not is_results_doc(doc):
            continue
        restat(doc)
        lines += [f"## {title(doc)}", "", f"`{Path(p).parent.relative_to(root)}`", ""]
        lines += markdown_tables(doc)
    out = root / "summary.md"
    out.write_text("\n".join(lines))
    return out


def cost_plot(docs: list[dict], out: Path) -> Path:
    """Accuracy against wall-clock per run relative to ``sum``, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(docs), figsize=(5 * len(docs), 4), squeeze=False)
    for ax, doc in zip(axes[0], docs):
        for n, e in doc["methods"].items():
            x, y = e["seconds_ratio_to_sum"], 100 * e["accuracy_mean"]
            ax.errorbar(x, y, yerr=100 * e["accuracy_std"], fmt="o", capsize=3)
            ax.annotate(n, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("wall-clock per run / sum's")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{doc['dataset']} / {doc['setting']}: accuracy vs cost", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
