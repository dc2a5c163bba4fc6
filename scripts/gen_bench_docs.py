"""Write the benchmark tables of ``docs/benchmarks.md`` from ``docs/results/bench``.

Every number on that page between ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->`` comes from the ``results.json`` and
``search.json`` files under ``docs/results/bench/`` (the ``--model mlp`` runs)
and ``docs/results/bench-transformer/`` (the ``transformer`` block); nothing is
copied by hand.
Every t interval, p-value, Holm adjustment and minimum detectable effect is
recomputed from the stored per-seed accuracies (``report.restat``).
``docs/results/bench/summary.md`` is regenerated the same way.

    python scripts/gen_bench_docs.py           # rewrite the blocks and summary.md
    python scripts/gen_bench_docs.py --check   # exit 1 if either differs (CI, via the tests)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bogc_core.integrations.bench.metrics import holm
from bogc_core.integrations.bench.report import (
    diff_text,
    is_results_doc,
    legend,
    markdown_tables,
    pp,
    restat,
    title,
)

REPO = Path(__file__).resolve().parents[1]
ORDER = ["standard", "missing", "fewshot-5", "fewshot-10", "noisy", "zeroshot"]
DATASETS = ["av-mnist", "av-digits", "mfeat", "scene15", "pie"]
#: the table of the default ``bogc bench``, where the positive control must pass
DEFAULT_TABLE = ("av-mnist", "standard")
#: the pre-registered confirmatory test (docs/benchmarks.md): bogc against sum, noisy setting
CONFIRM_SEEDS = 10


def load(root: Path) -> tuple[list[tuple[str, str, dict]], dict[str, dict]]:
    docs, searches = [], {}
    for ds_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        s = ds_dir / "search.json"
        if s.is_file():
            searches[ds_dir.name] = json.loads(s.read_text())
        for sub in sorted((p for p in ds_dir.iterdir() if p.is_dir()),
                          key=lambda p: ORDER.index(p.name) if p.name in ORDER else len(ORDER)):
            f = sub / "results.json"
            if f.is_file():
                doc = json.loads(f.read_text())
                if is_results_doc(doc):
                    # t intervals, p, mde and Holm from the stored per-seed accuracies, by the
                    # current code: never a stored p
                    docs.append((ds_dir.name, sub.name, restat(doc)))
    key = {d: i for i, d in enumerate(DATASETS)}
    docs.sort(key=lambda t: (key.get(t[0], len(key)), ORDER.index(t[1]) if t[1] in ORDER else 99))
    return docs, searches


def _cell(d: dict | None) -> str:
    return diff_text(d, bootstrap=False) if d else "-"


def headline(docs) -> list[str]:
    """One row per data set and setting: BOGC, norm-matched BOGC and the best other method vs sum."""
    L = ["| data set / setting | sum % | bogc − sum | bogc_normmatched − sum | best other (name: diff) "
         "| fixed budget: bogc − sum |", "|---|---|---|---|---|---|"]
    for ds, folder, doc in docs:
        m = doc["methods"]
        others = {n: e for n, e in m.items() if n not in ("sum", "bogc", "bogc_normmatched")}
        best = max(others, key=lambda n: others[n]["accuracy_mean"]) if others else None
        best_txt = f"{best}: {_cell(others[best].get('accuracy_diff_to_sum'))}" if best else "-"
        fb = doc["fixed_budget"].get("bogc", {}).get("accuracy_diff_to_sum")
        L.append(f"| {ds} / {folder} | {100 * m['sum']['accuracy_mean']:.2f} | "
                 f"{_cell(m.get('bogc', {}).get('accuracy_diff_to_sum'))} | "
                 f"{_cell(m.get('bogc_normmatched', {}).get('accuracy_diff_to_sum'))} | {best_txt} | "
                 f"{_cell(fb)} |")
    return [*L, "", legend()]


def missing_best_rule(docs) -> list[str]:
    """Per data set: each method's best rule (mean over removed modalities) and BOGC vs sum under it."""
    L = []
    for ds, _folder, doc in docs:
        if doc["setting"] != "missing":
            continue
        mods = doc["modalities"]
        L += [f"**{ds}**, mean accuracy % over which modality is removed:", "",
              "| method | zero_fill | mean_impute | surviving_heads | best rule |", "|---|---|---|---|---|"]
        for n, e in doc["methods"].items():
            vals = {r: sum(e["missing_rules"][r][mm]["accuracy_mean"] for mm in mods) / len(mods)
                    for r in ("zero_fill", "mean_impute", "surviving_heads")}
            best = max(vals, key=lambda r: vals[r])
            L.append(f"| {n} | " + " | ".join(f"{100 * v:.2f}" for v in vals.values()) + f" | {best} |")
        L.append("")
    return L


def search_table(searches: dict[str, dict]) -> list[str]:
    if not searches:
        return ["(no search results)"]
    names = sorted(searches, key=lambda d: DATASETS.index(d) if d in DATASETS else 99)
    variants = ["bogc"] + list(next(iter(searches.values()))["variants"])
    L = ["Mean validation accuracy % at the best epoch (3 tuning seeds) at `bogc`'s chosen learning "
         "rate; in brackets the difference to `bogc` in pp.", "",
         "| variant | " + " | ".join(f"{d} (lr {searches[d]['lr']})" for d in names) + " | wins everywhere |",
         "|---|" + "---|" * (len(names) + 1)]
    for v in variants:
        cells, wins = [], True
        for d in names:
            s = searches[d]
            lr = s["lr"]
            base = next(g for g in s["bogc"]["grid"] if g["params"]["lr"] == lr)["val_accuracy"]["plateau"]
            rec = s["bogc"] if v == "bogc" else s["variants"][v]
            val = next(g for g in rec["grid"] if g["params"]["lr"] == lr)["val_accuracy"]["plateau"]
            cells.append(f"{100 * val:.2f}" + ("" if v == "bogc" else f" ({pp(val - base)})"))
            wins = wins and val > base
        L.append(f"| {v} | " + " | ".join(cells) + f" | {'-' if v == 'bogc' else ('yes' if wins else 'no')} |")
    return L


def cost_lines(docs, searches) -> list[str]:
    L = ["| data set | training seconds, wall-clock: tuning | evaluation runs (all settings) | search |",
         "|---|---|---|---|"]
    by: dict[str, list[float]] = {}
    for ds, folder, doc in docs:
        t = by.setdefault(ds, [0.0, 0.0, 0.0])
        if folder == "standard":
            t[0] = sum(g["seconds"] for r in doc["tuning"].values() for g in r["grid"])
        if folder != "missing":  # missing reuses the standard runs
            t[1] += sum(e["seconds_per_run"] * len(e["accuracies"]) for e in doc["methods"].values())
    for ds, s in searches.items():
        by.setdefault(ds, [0.0, 0.0, 0.0])[2] = sum(
            g["seconds"] for r in s["variants"].values() for g in r["grid"])
    for ds, (a, b, c) in by.items():
        L.append(f"| {ds} | {a:.0f} | {b:.0f} | {c:.0f} |")
    return L


def _number(x: object) -> float:
    """A stored number; NaN for null."""
    return float("nan") if x is None else float(x)  # type: ignore[arg-type]


def tuning_line(doc: dict) -> str:
    """How a table's learning rates were chosen: the grid, and how many choices are interior."""
    prot = doc.get("protocol", {})
    line = prot.get("grid", "not recorded")
    inner = prot.get("interior")
    if inner:
        line += f"; {inner['count']} of {inner['of']} choices interior to the grid tried"
    return line + "."


def confirmatory(docs) -> list[str]:
    """The pre-registered test: bogc - sum in the noisy setting with CONFIRM_SEEDS seeds, the
    paired t-test per data set, Holm across the data sets, and the decision rule."""
    rows = [(ds, doc) for ds, folder, doc in docs
            if folder == "noisy" and "bogc" in doc["methods"]
            and len(doc["seeds"]) == CONFIRM_SEEDS]
    if not rows:
        return ["(not run yet)"]
    diffs = [doc["methods"]["bogc"]["accuracy_diff_to_sum"] for _, doc in rows]
    adjusted = holm([_number(d.get("p")) for d in diffs])
    L = [f"bogc - sum, test accuracy at the best validation epoch, {CONFIRM_SEEDS} seeds paired, "
         "noise of std 2 on the named modality; Holm across the data sets below.", "",
         "| data set | noisy modality | sum % | bogc % | bogc - sum, pp [95% t] | mde, pp | p | "
         "p (Holm) | decision |", "|---|---|---|---|---|---|---|---|---|"]
    for (ds, doc), d, ph in zip(rows, diffs, adjusted):
        m = doc["methods"]
        decision = "level" if not ph < 0.05 else ("supported" if d["mean"] > 0 else "contradicted")
        mde, p = _number(d.get("mde")), _number(d.get("p"))
        L.append(f"| {ds} | {doc['split'].get('noise_modality', '-')} | "
                 f"{100 * m['sum']['accuracy_mean']:.2f} | {100 * m['bogc']['accuracy_mean']:.2f} | "
                 f"{pp(d['mean'])} [{pp(d['ci_low'])}, {pp(d['ci_high'])}] | "
                 f"{100 * mde:.2f} | {p:.3g} | {ph:.3g} | {decision} |")
    return L


def positive_control(docs) -> list[str]:
    """Every comparison of the default table that differs from the sum after Holm's correction
    (the benchmark's evidence that it can detect an effect), or a line saying there is none."""
    found = [doc for ds, folder, doc in docs if (ds, folder) == DEFAULT_TABLE]
    if not found:
        return ["(not run yet)"]
    doc = found[0]
    diffs = {n: e["accuracy_diff_to_sum"] for n, e in doc["methods"].items()
             if e.get("accuracy_diff_to_sum")}
    hits = [n for n, d in diffs.items() if _number(d.get("p_holm")) < 0.05]
    head = (f"{' / '.join(DEFAULT_TABLE)}, {len(doc['seeds'])} seeds: {len(hits)} of "
            f"{len(diffs)} comparisons with the sum differ after Holm's correction")
    if not hits:
        return [head + ": none, so this table cannot show that the benchmark detects an effect."]
    L = [head + ":", ""]
    for n in hits:
        d = diffs[n]
        L.append(f"- `{n}`: {pp(d['mean'])} pp [{pp(d['ci_low'])}, {pp(d['ci_high'])}], "
                 f"p {_number(d['p']):.2g}, Holm p {_number(d['p_holm']):.2g} "
                 f"(mde {100 * _number(d['mde']):.2f} pp)")
    return L


def transformer_block(docs) -> list[str]:
    """The ``--model transformer`` runs: their headline rows, then every table."""
    if not docs:
        return ["(not run yet)"]
    L = headline(docs) + [""]
    for ds, _folder, doc in docs:
        L += [f"#### {title(doc)}", "", f"Tuning: {tuning_line(doc)}", ""] + markdown_tables(doc)
    return L


def blocks(docs, searches, transformer=()) -> dict[str, list[str]]:
    results: list[str] = []
    for ds, folder, doc in docs:
        results += [f"### {title(doc)}", "",
                    f"Plots: `docs/results/bench/{ds}/{folder}/accuracy_curves.png`; cost: "
                    f"`docs/results/bench/{ds}/cost_accuracy.png`.", "",
                    f"Tuning: {tuning_line(doc)}", ""]
        results += markdown_tables(doc)
    return {"headline": headline(docs), "missing": missing_best_rule(docs),
            "confirmatory": confirmatory(docs), "positive": positive_control(docs),
            "search": search_table(searches), "cost": cost_lines(docs, searches), "results": results,
            "transformer": transformer_block(list(transformer))}


def render(md: str, generated: dict[str, list[str]]) -> str:
    for name, lines in generated.items():
        pat = re.compile(rf"(<!-- BEGIN GENERATED: {name} -->\n)(.*?)(<!-- END GENERATED: {name} -->)", re.S)
        if not pat.search(md):
            raise SystemExit(f"docs/benchmarks.md has no '<!-- BEGIN GENERATED: {name} -->' block")
        body = "\n".join(lines).rstrip() + "\n"
        md = pat.sub(lambda m: m.group(1) + body + m.group(3), md)  # noqa: B023 (used at once)
    return md


def summary(docs) -> str:
    lines = ["# bogc bench summary", "", "Generated by `scripts/gen_bench_docs.py` from the "
             "`results.json` files next to this file.", ""]
    for _ds, _folder, doc in docs:
        lines += [f"## {title(doc)}", ""] + markdown_tables(doc)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail on drift instead of writing")
    p.add_argument("--results", default=str(REPO / "docs" / "results" / "bench"))
    p.add_argument("--transformer-results", default=str(REPO / "docs" / "results" / "bench-transformer"))
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    root, doc_path = Path(args.results), Path(args.doc)
    docs, searches = load(root)
    troot = Path(args.transformer_results)
    tdocs = load(troot)[0] if troot.is_dir() else []
    want_md = render(doc_path.read_text(), blocks(docs, searches, tdocs))
    want_summary = summary(docs)
    targets = [(doc_path, want_md), (root / "summary.md", want_summary)]
    if args.check:
        drift = [str(path) for path, text in targets if not path.is_file() or path.read_text() != text]
        if drift:
            print("out of date (run python scripts/gen_bench_docs.py): " + ", ".join(drift))
            return 1
        print("docs tables match the results files")
        return 0
    for path, text in targets:
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
