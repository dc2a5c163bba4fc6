"""``bogc bench``: train the same model with BOGC and the baselines, side by side.

Usage (API.md)::

    bogc bench [--quick] [--dataset NAME_OR_PATH] [--methods LIST] [--seeds N]
               [--epochs N] [--setting {standard,missing,fewshot,noisy}] [--out DIR]

plus ``--tune`` (choose hyper-parameters on the validation split first),
``--shots K`` (few-shot), ``--noise-std S`` / ``--noise-modality M`` (noisy),
``--all`` (every shipped data set and setting; one sub-folder each and a
combined ``summary.md``) and ``--threads``. Writes ``results.json``,
``accuracy_curves.png`` and ``bogc_diagnostics.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SETTING_CHOICES = ("standard", "missing", "fewshot", "noisy")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bogc bench",
        description="Train one multi-modal model per method (BOGC and baselines) and compare.",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 3 methods, 2 seeds, 3 epochs, "
                   "512 training rows, under a minute")
    p.add_argument("--dataset", default="av-digits",
                   help="shipped data set ('av-digits', 'mfeat') or a .npz path (default av-digits; "
                   "with --all a comma list)")
    p.add_argument("--methods", default=None,
                   help="comma list of methods, or 'main', 'ablations', 'all' (default main)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 10; quick 3)")
    p.add_argument("--setting", choices=SETTING_CHOICES, default="standard")
    p.add_argument("--out", default="bogc-bench", help="output folder (default ./bogc-bench)")
    p.add_argument("--tune", action="store_true",
                   help="choose learning rate (and gamma / alpha) on the validation split first")
    p.add_argument("--tune-seeds", type=int, default=2, help="seeds per grid point with --tune")
    p.add_argument("--shots", type=int, default=5, help="labelled examples per class (fewshot)")
    p.add_argument("--noise-std", type=float, default=2.0, help="noise strength (noisy)")
    p.add_argument("--noise-modality", default=None,
                   help="modality corrupted in 'noisy' (default: the strongest shipped one, or the first)")
    p.add_argument("--all", action="store_true",
                   help="every shipped data set (or --dataset list) x every setting, fewshot k=5 and 10")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------------- running
def _progress(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=disable, leave=False,
                file=sys.stderr, dynamic_ncols=True)


def tune_methods(data, names: list[str], cfg, tune_seeds: int, disable: bool) -> dict[str, Any]:
    """Grid search of :data:`registry.GRIDS` on the validation split of the standard setting."""
    from .experiments import registry
    from .experiments.harness import grid_points, tune
    from .experiments.settings import make_split

    split = make_split(data, "standard")
    seeds = [100 + i for i in range(tune_seeds)]
    todo = [n for n in names if n in registry.GRIDS]
    total = sum(len(grid_points(registry.GRIDS[n])) * len(seeds) for n in todo)
    chosen: dict[str, Any] = {}
    with _progress(total, f"tune {data.name}", disable) as bar:
        for n in todo:
            m = registry.build(n)
            m.grid = registry.GRIDS[n]
            bar.set_postfix_str(n)
            _, record = tune(split, m, cfg, seeds)
            bar.update(len(grid_points(m.grid)) * len(seeds))
            chosen[n] = record
    return chosen


def run_setting(data, setting: str, names: list[str], seeds: list[int], cfg, chosen_params,
                shots: int, noise_std: float, noise_modality: str | None, max_train: int | None,
                disable: bool) -> dict[str, Any]:
    """Train every method on every seed; return the raw per-run records."""
    from .experiments import registry
    from .experiments.harness import train_run
    from .experiments.settings import make_split

    train_setting = "standard" if setting == "missing" else setting
    records: dict[str, list[dict]] = {n: [] for n in names}
    described: dict[str, Any] = {}
    split_info: dict[str, Any] = {}
    desc = f"{data.name}/{setting}" + (f"-{shots}" if setting == "fewshot" else "")
    with _progress(len(names) * len(seeds), desc, disable) as bar:
        for seed in seeds:
            split = make_split(data, train_setting, seed=seed, shots=shots, noise_std=noise_std,
                               noise_modality=noise_modality, max_train=max_train)
            split_info = dict(split.info, n_train=int(split.y_train.size), n_val=int(split.y_val.size),
                              n_test=int(split.y_test.size))
            for n in names:
                bar.set_postfix_str(f"{n} seed {seed}")
                method = registry.configured(n, data.name, chosen_params)
                records[n].append(train_run(split, method, seed, cfg))
                described[n] = method.describe()
                bar.update(1)
    return {"records": records, "described": described, "split": split_info}


# --------------------------------------------------------------------------- summarising
def _stats(values: list[float], base: list[float] | None) -> dict[str, Any]:
    from .experiments.metrics import mean_std, paired_difference

    m, s = mean_std(values)
    out: dict[str, Any] = {"mean": m, "std": s, "values": [float(v) for v in values]}
    if base is not None:
        out["diff_to_sum"] = paired_difference(values, base)
    return out


def summarize(data, setting: str, raw: dict[str, Any], seeds: list[int], cfg, extra: dict) -> dict:
    """The ``results.json`` document for one data set and setting."""
    recs = raw["records"]
    base = recs.get("sum")
    methods: dict[str, Any] = {}
    for n, rs in recs.items():
        if setting == "missing":
            # one number per seed: mean over which modality is removed
            accs = [float(np.mean(list(r["missing_accuracy"].values()))) for r in rs]
            f1s = [float(np.mean(list(r["missing_macro_f1"].values()))) for r in rs]
            b_acc = ([float(np.mean(list(r["missing_accuracy"].values()))) for r in base]
                     if base else None)
            b_f1 = [float(np.mean(list(r["missing_macro_f1"].values()))) for r in base] if base else None
        else:
            accs = [r["accuracy"] for r in rs]
            f1s = [r["macro_f1"] for r in rs]
            b_acc = [r["accuracy"] for r in base] if base else None
            b_f1 = [r["macro_f1"] for r in base] if base else None
        a = _stats(accs, b_acc)
        f = _stats(f1s, b_f1)
        entry: dict[str, Any] = {
            "accuracy_mean": a["mean"],
            "accuracy_std": a["std"],
            "accuracies": a["values"],
            "macro_f1_mean": f["mean"],
            "macro_f1_std": f["std"],
            "macro_f1s": f["values"],
            "seconds_per_run": float(np.mean([r["seconds"] for r in rs])),
            "val_accuracy_mean": float(np.mean([r["val_accuracy"] for r in rs])),
            "config": raw["described"].get(n, {}),
            "test_curve_mean": np.mean([r["test_curve"] for r in rs], axis=0).tolist()
            if rs and rs[0]["test_curve"] else [],
            "unimodal_accuracy_mean": {
                m: float(np.mean([r["unimodal_accuracy"][m] for r in rs])) for m in data.modalities
            },
        }
        if "diff_to_sum" in a:
            entry["accuracy_diff_to_sum"] = a["diff_to_sum"]
            entry["macro_f1_diff_to_sum"] = f["diff_to_sum"]
        if setting == "missing":
            by: dict[str, Any] = {}
            for m in data.modalities:
                v = [r["missing_accuracy"][m] for r in rs]
                bv = [r["missing_accuracy"][m] for r in base] if base else None
                s = _stats(v, bv)
                by[m] = {"accuracy_mean": s["mean"], "accuracy_std": s["std"], "accuracies": s["values"]}
                if "diff_to_sum" in s:
                    by[m]["accuracy_diff_to_sum"] = s["diff_to_sum"]
            entry["removed_modality"] = by
            entry["full_accuracy_mean"] = float(np.mean([r["accuracy"] for r in rs]))
        diags = [r["diagnostics"] for r in rs]
        keys = sorted({k for d in diags for ep in d for k in ep})
        if keys:
            entry["diagnostics_curve_mean"] = {
                k: [float(np.mean([d[e][k] for d in diags if k in d[e]])) for e in range(len(diags[0]))]
                for k in keys
            }
        methods[n] = entry
    doc = {
        "dataset": data.name,
        "setting": setting,
        "modalities": list(data.modalities),
        "seeds": seeds,
        "epochs": cfg.epochs,
        "train_config": {k: v for k, v in cfg.__dict__.items() if k != "curves"},
        "split": raw["split"],
        "methods": methods,
    }
    doc.update(extra)
    return doc


def format_table(doc: dict) -> str:
    """Plain-text table: accuracy mean +- std, macro-F1, paired difference to ``sum`` [95% CI]."""
    head = f"{doc['dataset']} / {doc['setting']}"
    if doc["split"].get("shots"):
        head += f" (k={doc['split']['shots']})"
    if doc["split"].get("noise_modality"):
        head += f" (noise std {doc['split']['noise_std']} on {doc['split']['noise_modality']})"
    head += f", {len(doc['seeds'])} seeds, {doc['epochs']} epochs"
    lines = [head, f"{'method':<20} {'accuracy':>15} {'macro-F1':>15} {'diff to sum [95% CI]':>30} {'s/run':>7}"]
    for n, e in doc["methods"].items():
        d = e.get("accuracy_diff_to_sum")
        if n == "sum" or d is None:
            dtxt = "-"
        elif math.isnan(d["ci_low"]):
            dtxt = f"{100 * d['mean']:+.2f}"
        else:
            dtxt = f"{100 * d['mean']:+.2f} [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"
        lines.append(
            f"{n:<20} {100 * e['accuracy_mean']:>8.2f} ± {100 * e['accuracy_std']:<4.2f} "
            f"{100 * e['macro_f1_mean']:>8.2f} ± {100 * e['macro_f1_std']:<4.2f} {dtxt:>30} "
            f"{e['seconds_per_run']:>7.1f}"
        )
    if doc["setting"] == "missing":
        mods = doc["modalities"]
        lines.append("accuracy with one modality removed at test time (mean over seeds):")
        lines.append(f"{'method':<20} " + " ".join(f"{'-' + m:>10}" for m in mods))
        for n, e in doc["methods"].items():
            lines.append(f"{n:<20} " + " ".join(
                f"{100 * e['removed_modality'][m]['accuracy_mean']:>10.2f}" for m in mods))
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
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


# --------------------------------------------------------------------------- driver
def _bogc_implementation() -> str:
    from .experiments.bogc_method import real_calibrator

    return ("bogc_core.integrations.torch.GradientCalibrator" if real_calibrator() is not None
            else "fallback adapter bogc_core.integrations.experiments.bogc_adapter (microbatch only)")


def run_one(data, setting, names, seeds, cfg, chosen, tune_record, args, out: Path, max_train,
            raw=None, shots=None) -> tuple[dict, Any]:
    shots = args.shots if shots is None else shots
    if raw is None:
        raw = run_setting(data, setting, names, seeds, cfg, chosen, shots, args.noise_std,
                          args.noise_modality, max_train, args.no_progress)
    extra = {
        "hyperparameters": {n: raw["described"][n] for n in names},
        "tuning": tune_record,
        "bogc_implementation": _bogc_implementation(),
        "notes": [
            "accuracy of the fusion head after the last epoch; paired differences use the same "
            "seed (initialisation and batch order) for every method",
            "hyper-parameters chosen on a validation split carved from the training data "
            "(--tune), never on the test split",
        ],
    }
    if data.name == "av-digits":
        extra["notes"].append("av-digits pairs audio and image by class only (AV-MNIST style): "
                              "nothing co-occurs across modalities beyond the label")
    doc = summarize(data, setting, raw, seeds, cfg, extra)
    out.mkdir(parents=True, exist_ok=True)
    doc["plots"] = plot(doc, out)
    with open(out / "results.json", "w") as f:
        json.dump(doc, f, indent=1)
    print(format_table(doc), flush=True)
    print(f"-> {out / 'results.json'}", flush=True)
    return doc, raw


def write_summary(root: Path) -> Path:
    """Collect every ``results.json`` under ``root`` into ``summary.md`` (markdown tables)."""
    order = ["standard", "missing", "fewshot-5", "fewshot-10", "noisy"]

    def key(p: Path):
        rel = p.parent.relative_to(root).parts
        last = rel[-1] if rel else ""
        return (rel[:-1], order.index(last) if last in order else len(order), last)

    docs = []
    for p in sorted(root.rglob("results.json"), key=key):
        try:
            docs.append((p.parent.relative_to(root), json.loads(p.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    lines = ["# bogc bench summary", ""]
    for rel, d in docs:
        title = f"{d['dataset']} / {d['setting']}"
        if d["split"].get("shots"):
            title += f" k={d['split']['shots']}"
        if d["split"].get("noise_modality"):
            title += f" (noise std {d['split']['noise_std']} on {d['split']['noise_modality']})"
        lines += [f"## {title}", "", f"{len(d['seeds'])} seeds, {d['epochs']} epochs; "
                  f"plots: `{rel}/accuracy_curves.png`, `{rel}/bogc_diagnostics.png`", ""]
        lines.append("| method | accuracy % | macro-F1 % | diff to sum (pp) [95% CI] |")
        lines.append("|---|---|---|---|")
        for n, e in d["methods"].items():
            dd = e.get("accuracy_diff_to_sum")
            if n == "sum" or not dd:
                dt = "-"
            elif dd["ci_low"] != dd["ci_low"]:
                dt = f"{100 * dd['mean']:+.2f}"
            else:
                dt = f"{100 * dd['mean']:+.2f} [{100 * dd['ci_low']:+.2f}, {100 * dd['ci_high']:+.2f}]"
            lines.append(f"| {n} | {100 * e['accuracy_mean']:.2f} ± {100 * e['accuracy_std']:.2f} | "
                         f"{100 * e['macro_f1_mean']:.2f} ± {100 * e['macro_f1_std']:.2f} | {dt} |")
        if d["setting"] == "missing":
            mods = d["modalities"]
            lines += ["", "Accuracy % with one modality removed at test time:", "",
                      "| method | " + " | ".join(f"without {m}" for m in mods) + " |",
                      "|---|" + "---|" * len(mods)]
            for n, e in d["methods"].items():
                lines.append(f"| {n} | " + " | ".join(
                    f"{100 * e['removed_modality'][m]['accuracy_mean']:.2f}" for m in mods) + " |")
        lines.append("")
    path = root / "summary.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from bogc_core.errors import BOGCError, ConfigError

    from .data import load_dataset
    from .experiments import registry
    from .experiments.harness import TrainConfig

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    try:
        if args.quick:
            names = registry.expand(args.methods) if args.methods else list(registry.QUICK_METHODS)
            seeds_n, epochs, max_train = args.seeds or 2, args.epochs or 3, 512
        else:
            names = registry.expand(args.methods)
            seeds_n, epochs, max_train = args.seeds or 5, args.epochs or 10, None
        for must in ("sum", "bogc"):
            if must not in names:
                names.insert(0 if must == "sum" else 1, must)
        if seeds_n < 1 or epochs < 1:
            raise ConfigError("--seeds and --epochs: must be >= 1")
        seeds = list(range(seeds_n))
        cfg = TrainConfig(epochs=epochs)
        datasets = args.dataset.split(",") if args.all else [args.dataset]
        t0 = time.perf_counter()
        for ds in datasets:
            data = load_dataset(ds)
            chosen, record = None, {}
            if args.tune:
                record = tune_methods(data, [n for n in names if n not in registry.ABLATIONS], cfg,
                                      args.tune_seeds, args.no_progress)
                chosen = {n: r["chosen"] for n, r in record.items() if r}
            if not args.all:
                run_one(data, args.setting, names, seeds, cfg, chosen, record, args, out, max_train)
                continue
            base = out / data.name
            main_names = [n for n in names if n not in registry.ABLATIONS]
            _, raw = run_one(data, "standard", names, seeds, cfg, chosen, record, args,
                             base / "standard", max_train)
            main_raw = dict(raw, records={n: raw["records"][n] for n in main_names})
            run_one(data, "missing", main_names, seeds, cfg, chosen, record, args, base / "missing",
                    max_train, raw=main_raw)
            for k in (5, 10):
                run_one(data, "fewshot", main_names, seeds, cfg, chosen, record, args,
                        base / f"fewshot-{k}", max_train, shots=k)
            run_one(data, "noisy", main_names, seeds, cfg, chosen, record, args, base / "noisy",
                    max_train)
        if args.all:
            print(f"-> {write_summary(out)}")
        print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    except BOGCError as exc:
        print(f"bogc bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
