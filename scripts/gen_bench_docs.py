"""Write the benchmark tables of ``docs/benchmarks.md`` from ``docs/results/bench``.

Every number on that page between ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->`` comes from the ``results.json`` and
``search.json`` files under ``docs/results/bench/``; nothing is copied by hand.
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
ORDER = ["standard", "missing", "fewshot-5", "fewshot-10", "noisy"]
DATASETS = ["av-digits", "mfeat", "scene15", "pie"]


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


def blocks(docs, searches) -> dict[str, list[str]]:
    results: list[str] = []
    for ds, folder, doc in docs:
        results += [f"### {title(doc)}", "",
                    f"Plots: `docs/results/bench/{ds}/{folder}/accuracy_curves.png`; cost: "
                    f"`docs/results/bench/{ds}/cost_accuracy.png`.", ""]
        results += markdown_tables(doc)
    return {"headline": headline(docs), "missing": missing_best_rule(docs),
            "search": search_table(searches), "cost": cost_lines(docs, searches), "results": results}


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
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    root, doc_path = Path(args.results), Path(args.doc)
    docs, searches = load(root)
    want_md = render(doc_path.read_text(), blocks(docs, searches))
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
