"""``bogc bench``: train the same model with BOGC and the baselines under one fair protocol.

Usage::

    bogc bench [--quick] [--dataset NAME_OR_PATH] [--methods LIST] [--seeds N]
               [--epochs N] [--setting {standard,missing,fewshot,noisy,zeroshot}]
               [--model {mlp,transformer}] [--out DIR]

Every method's learning rate is chosen on the validation split first, the
same way for every method (base grid 0.003 to 1.0 in half-decade steps, two
points beyond its edges toward the best one, successive halving over
``--tune-seeds`` seeds; ``--no-tune`` skips it), then
each method is trained on ``--seeds`` seeds with early stopping on validation
(``--max-epochs``, ``--patience``) and evaluated at the best validation epoch
and after the fixed budget of ``--epochs`` epochs. ``--all`` runs every
setting of each data set of ``--dataset`` (a comma list); ``--search`` runs
the pre-registered validation search over BOGC's variants instead. Every
file written is printed. Before any training, every file the run will write
is checked: a folder that already holds one of them (an earlier run) is
refused with exit status 2 unless ``--overwrite`` is given, and a file that
could not be written is refused too, so a failed start leaves ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bogc_core.errors import BOGCError, ConfigError

from .pool import Pool, search_task, train_task, tune_task

SETTING_CHOICES = ("standard", "missing", "fewshot", "noisy", "zeroshot")
#: the folders of ``--all``: (setting, shots)
ALL_JOBS = {"standard": ("standard", None), "missing": ("missing", None), "fewshot-5": ("fewshot", 5),
            "noisy": ("noisy", None), "fewshot-10": ("fewshot", 10),
            "zeroshot": ("zeroshot", None)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bogc bench",
        description="Train one multi-modal model per method (BOGC and baselines), each with its "
        "learning rate chosen on validation, and compare them with the sum of losses paired by "
        "seed: the mean difference, its 95%% t interval, a mark (level: the interval covers 0; "
        "*: significant after Holm's correction; ~: not after it) and the minimum detectable "
        "effect at 80%% power.",
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke run: methods sum,bogc,pcgrad, 2 seeds, 1 tuning seed (8 learning "
                   "rates), at most 3 epochs, 512 training rows (under a minute)")
    p.add_argument("--dataset", default="av-mnist",
                   help="shipped data set ('av-mnist', 'av-digits', 'mfeat') or a .npz path with y, "
                   "x_<modality> and optional test_mask (default av-mnist; with --all or --search a "
                   "comma list)")
    p.add_argument("--methods", default=None,
                   help="comma list of methods, or the groups 'main', 'ablations', 'search', 'all' "
                   "(default main; sum and bogc are always added)")
    p.add_argument("--seeds", type=int, default=None,
                   help="evaluation seeds, >= 1 (default 10; quick 2)")
    p.add_argument("--epochs", type=int, default=None,
                   help="the fixed training budget in epochs, >= 1 (default 10; quick 2)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="most epochs with early stopping, >= --epochs (default 40; quick 3)")
    p.add_argument("--patience", type=int, default=5,
                   help="early stopping: epochs without a validation gain before stopping (default 5)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="training batch size, >= 1 (default 128)")
    p.add_argument("--setting", choices=SETTING_CHOICES, default="standard",
                   help="standard; missing (one modality removed at test time, three rules); "
                   "fewshot (--shots labelled rows per class); noisy (Gaussian noise of --noise-std "
                   "on --noise-modality); zeroshot (train on the seen classes, retrieve unseen-class "
                   "rows across modalities; needs 4 or more classes) (default standard)")
    p.add_argument("--model", choices=("mlp", "transformer"), default="mlp",
                   help="mlp: one MLP encoder per modality and late fusion; transformer: a 2-layer "
                   "fusion transformer over every modality's tokens, each parameter shared by "
                   "every loss (default mlp)")
    p.add_argument("--out", default="bogc-bench",
                   help="output folder (default ./bogc-bench); every file the run will write is "
                   "checked before any training, and a folder holding an earlier run's files is "
                   "refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier run in --out (other files there are "
                   "left alone)")
    p.add_argument("--no-tune", action="store_true",
                   help="skip the validation search and use learning rate 0.03 for every method "
                   "(no tuning record; the protocol entry says so)")
    p.add_argument("--reuse-tuning", default=None, metavar="DIR",
                   help="take the validation choices from DIR/<dataset>/standard/results.json of an "
                   "earlier --all run instead of tuning again (the record is copied along)")
    p.add_argument("--tune-seeds", type=int, default=None,
                   help="seeds of the learning-rate search on validation, >= 1 (default 3; quick "
                   "1): every point of the grid 0.003-1.0 (half-decade steps) and 2 points beyond "
                   "its edges train on the first seed, then half of the points alive on each "
                   "further seed (successive halving; 14 runs per method with 3 seeds)")
    p.add_argument("--shots", type=int, default=5, help="labelled examples per class in fewshot (default 5)")
    p.add_argument("--noise-std", type=float, default=2.0,
                   help="standard deviation of the noise, in standardised units, in noisy (default 2)")
    p.add_argument("--noise-modality", default=None,
                   help="modality corrupted in noisy (default: the strongest shipped one, or the first)")
    p.add_argument("--all", action="store_true",
                   help="every setting (fewshot k=5 and 10) of every data set in --dataset, one "
                   "sub-folder each, a cost_accuracy.png per data set and summary.md")
    p.add_argument("--settings", default=",".join(ALL_JOBS),
                   help="with --all: comma list of the settings to run, in order, from "
                   f"{', '.join(ALL_JOBS)} (default all)")
    p.add_argument("--search", action="store_true",
                   help="also run the pre-registered search: BOGC's variants on the validation "
                   "split only, at bogc's chosen learning rate; writes search.json")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes training runs side by side, >= 1 (default: the cores "
                   "available, at most 8); every run gives the same numbers for any --jobs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker, >= 1 (default 1: small models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _cores() -> int:
    """The cores this process may run on (all of the machine's where that is not known)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _positive(name: str, value: int | None, least: int = 1) -> None:
    if value is not None and value < least:
        raise ConfigError(f"{name}: must be >= {least}, got {value}; pass {name} {max(least, 1)} "
                          f"or more (or leave it out for the default)")


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that cannot run, before anything is trained."""
    for name, v in (("--seeds", args.seeds), ("--epochs", args.epochs),
                    ("--max-epochs", args.max_epochs), ("--tune-seeds", args.tune_seeds),
                    ("--shots", args.shots), ("--threads", args.threads), ("--jobs", args.jobs),
                    ("--batch-size", args.batch_size)):
        _positive(name, v)
    _positive("--patience", args.patience, least=0)
    if not (math.isfinite(args.noise_std) and args.noise_std >= 0):
        raise ConfigError(f"--noise-std: must be a finite number >= 0, got {args.noise_std}")
    if args.epochs is not None and args.max_epochs is not None and args.max_epochs < args.epochs:
        raise ConfigError(f"--max-epochs: {args.max_epochs} is below the fixed budget --epochs "
                          f"{args.epochs}; raise --max-epochs or lower --epochs")
    for job in args.settings.split(","):
        if job not in ALL_JOBS:
            raise ConfigError(f"--settings: unknown {job!r}; choose from {', '.join(ALL_JOBS)}")
    if args.search and args.no_tune:
        raise ConfigError("--search: needs bogc's learning rate chosen on validation; drop --no-tune")


def planned_outputs(args: argparse.Namespace, out: Path, datasets: list[str]) -> list[Path]:
    """Every file the run will write, in the order it writes them (``datasets``: loaded names)."""
    from .plots import ACCURACY_PNG, DIAGNOSTICS_PNG

    per_setting = ("results.json", ACCURACY_PNG, DIAGNOSTICS_PNG)
    if not args.all:
        return [out / "search.json"] * args.search + [out / f for f in per_setting]
    paths: list[Path] = []
    for name in datasets:
        base = out / name
        paths += [base / "search.json"] * args.search
        for folder in args.settings.split(","):
            paths += [base / folder / f for f in per_setting]
            if ALL_JOBS[folder][0] == "standard":
                paths.append(base / "cost_accuracy.png")
    paths.append(out / "summary.md")
    return list(dict.fromkeys(paths))


def _refuse(path: Path, why: str, fix: str) -> ConfigError:
    return ConfigError(f"--out: cannot write {str(path)!r} ({why}); {fix}")


def check_writable(out: Path, paths: list[Path], overwrite: bool) -> None:
    """Refuse, before any training and without changing anything, a run that could not write
    every file of ``paths`` (under ``out``) or that would replace an earlier run's files
    without ``overwrite``. Raises :class:`ConfigError`; creates no folder and no file."""
    earlier = [p for p in paths if p.exists() or p.is_symlink()]
    if earlier and not overwrite:
        shown = ", ".join(str(p.relative_to(out)) for p in earlier[:3])
        more = f" and {len(earlier) - 3} more" if len(earlier) > 3 else ""
        raise ConfigError(f"--out: {str(out)!r} already holds the results of an earlier run "
                          f"({shown}{more}); pass --overwrite to replace them, or choose another "
                          f"--out")
    fix = "make it writable or choose another --out"
    for p in earlier:
        if p.is_dir():
            raise _refuse(p, "it is a folder", "move it away or choose another --out")
        try:
            with open(p, "r+b"):  # opened for writing, nothing written
                pass
        except OSError as exc:
            raise _refuse(p, exc.strerror or str(exc), fix) from None
    for folder in dict.fromkeys(p.parent for p in paths if p not in earlier):
        ancestor = folder
        while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise _refuse(folder, f"{str(ancestor)!r} is a file, not a folder",
                          "choose a writable folder for --out")
        try:  # a file can be created where the folders will be made
            fd, probe = tempfile.mkstemp(prefix=".bogc-bench-", dir=ancestor)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise _refuse(folder, exc.strerror or str(exc),
                          f"make {str(ancestor)!r} writable or choose a writable folder for "
                          f"--out") from None


def _progress(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=disable, leave=False,
                file=sys.stderr, dynamic_ncols=True)


def reused_tuning(root: Path, dataset: str, names: list[str]) -> dict[str, Any]:
    """The ``tuning`` record of ``root/<dataset>/standard/results.json`` for ``names``."""
    path = root / dataset / "standard" / "results.json"
    try:
        tuning = json.loads(path.read_text())["tuning"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--reuse-tuning: cannot read the tuning record of {str(path)!r} ({exc}); "
                          f"point it at the --out folder of an earlier --all run") from None
    missing = [n for n in names if n not in tuning]
    if missing:
        raise ConfigError(f"--reuse-tuning: {str(path)!r} has no tuning for {missing}; tune them "
                          f"(drop --reuse-tuning) or leave them out of --methods")
    return {n: tuning[n] for n in names}


def _longest_first(names: list[str]) -> list[str]:
    from .methods import registry

    return sorted(names, key=lambda n: -registry.build(n).cost)


def tune_methods(data, names: list[str], cfg, tune_seeds: list[int], max_train: int | None,
                 disable: bool, pool: Pool) -> dict[str, Any]:
    """Every method's learning rate chosen on validation (:func:`.protocol.tune_lr` over
    :data:`registry.LR_GRID` and its extensions), in the standard setting, one method per
    task of ``pool``."""
    from .methods import registry
    from .protocol import tuning_budget
    from .settings import make_split

    split = make_split(data, "standard", max_train=max_train)
    records: dict[str, Any] = {}
    per_method = tuning_budget(len(registry.LR_GRID), registry.LR_EXTENSIONS, len(tune_seeds))
    tasks = [(n, tune_task, (split, n, cfg, tune_seeds)) for n in _longest_first(names)]
    with _progress(len(names) * per_method, f"tune {data.name}", disable) as bar:
        for n, record in pool.run(tasks):
            records[n] = record
            bar.set_postfix_str(f"{n} tuned")
            bar.update(per_method)
    return {n: records[n] for n in names}


def protocol_record(tuning: dict[str, Any], no_tune: bool) -> dict[str, Any]:
    """The ``protocol`` entry of ``results.json``: how the choices were made, the budget, and
    how many choices are interior to the grid tried."""
    from .methods import registry
    from .protocol import SELECTIONS

    interior = [(n, sel, bool(r["interior"][sel])) for n, r in tuning.items()
                if "interior" in r for sel in SELECTIONS]
    return {
        "grid": f"learning rate on the ladder 1, 3 x 10^k (half-decade steps); base grid "
                f"{registry.LR_GRID} ({registry.LR_GRID[-1] / registry.LR_GRID[0]:.0f}x), "
                f"plus {registry.LR_EXTENSIONS} points beyond its edges, the same rule for "
                f"every method (see 'extensions' per method under 'tuning')",
        "base_grid": list(registry.LR_GRID),
        "extensions_per_method": registry.LR_EXTENSIONS,
        "own_hyperparameters": "fixed at their defaults for every method (BOGC's "
                               "CalibrationConfig(), OGM-GE's alpha, MMPareto's gamma); "
                               "only the learning rate is tuned",
        "scheme": "successive halving over the tuning seeds: every grid point on the first "
                  "seed, then half of the points alive (the next best by plateau and by fixed, "
                  "in turn) on each further seed; the choice is the best of the last rung",
        "budget": {n: r.get("configurations") for n, r in tuning.items()},
        "tie_rule": "highest mean validation accuracy; on equal means the smaller learning rate; "
                    "a diverged run (non-finite loss or gradient) scores 0",
        "selection": "tuned in the standard setting on the validation split; 'plateau' choices "
                     "by the best-epoch validation accuracy, 'fixed' choices by the validation "
                     "accuracy after the fixed budget; reused in every setting",
        "tuning": "off (learning rate "
                  f"{registry.FALLBACK_LR})" if no_tune else "on",
        "interior": {"count": sum(i for *_, i in interior), "of": len(interior),
                     "at_edge": [f"{n}/{sel}" for n, sel, i in interior if not i]},
    }


class Runner:
    """Evaluation runs of one data set, cached by (setting, method, parameters, seed)."""

    def __init__(self, data, cfg, chosen: dict[str, dict[str, dict]], max_train: int | None,
                 args: argparse.Namespace):
        self.data, self.cfg, self.chosen, self.max_train, self.args = data, cfg, chosen, max_train, args
        self.cache: dict[tuple, dict] = {}
        self.described: dict[str, Any] = {}

    def params(self, name: str, sel: str) -> dict:
        from .methods.registry import FALLBACK_LR

        return dict(self.chosen.get(name, {}).get(sel, {"lr": FALLBACK_LR}))

    def run_setting(self, setting: str, names: list[str], seeds: list[int], shots: int,
                    pool: Pool) -> tuple[dict, dict]:
        from .methods import registry
        from .settings import make_split

        train_setting = "standard" if setting == "missing" else setting
        split_info: dict[str, Any] = {}
        keys: dict[tuple[int, str, str], tuple] = {}
        tasks = []
        queued: set[tuple] = set()
        for seed in seeds:
            split = make_split(self.data, train_setting, seed=seed, shots=shots,
                               noise_std=self.args.noise_std, noise_modality=self.args.noise_modality,
                               max_train=self.max_train)
            split_info = dict(split.info, n_train=int(split.y_train.size),
                              n_val=int(split.y_val.size), n_test=int(split.y_test.size))
            for n in names:
                for sel in ("plateau", "fixed"):
                    p = self.params(n, sel)
                    key = (train_setting, shots if train_setting == "fewshot" else None, n,
                           tuple(sorted(p.items())), seed)
                    keys[seed, n, sel] = key
                    if key not in self.cache and key not in queued:
                        queued.add(key)
                        tasks.append((key, train_task, (split, n, p, seed, self.cfg)))
        methods = {n: registry.build(n) for n in names}
        for n in names:
            self.described[n] = methods[n].with_params(**self.params(n, "fixed")).describe()
        tasks.sort(key=lambda t: -methods[t[0][2]].cost)  # stable: seed order kept
        desc = f"{self.data.name}/{setting}" + (f"-{shots}" if setting == "fewshot" else "")
        with _progress(len(tasks), desc, self.args.no_progress) as bar:
            for key, result in pool.run(tasks):
                self.cache[key] = result
                bar.set_postfix_str(f"{key[2]} seed {key[4]}")
                bar.update(1)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for seed in seeds:
            for n in names:
                rec = {sel: self.cache[keys[seed, n, sel]] for sel in ("plateau", "fixed")}
                # the headline run carries the curves and cost; the fixed-budget result may
                # come from a run at another learning rate
                merged = dict(rec["plateau"])
                merged["results"] = {"plateau": rec["plateau"]["results"]["plateau"],
                                     "fixed": rec["fixed"]["results"]["fixed"]}
                runs[n].append(merged)
        return runs, split_info


def run_one(runner: Runner, setting: str, names: list[str], seeds: list[int], tuning: dict,
            out: Path, shots: int, pool: Pool) -> tuple[dict, list[Path]]:
    from .plots import plot
    from .report import dump_json, format_table, summarize

    runs, split_info = runner.run_setting(setting, names, seeds, shots, pool)
    notes = [
        "paired differences use the same seed (initialisation and batch order) for every method",
        "hyper-parameters are chosen on a validation split carved from the training data, "
        "never on the test split",
    ]
    extra: dict[str, Any] = {
        "protocol": protocol_record(tuning, runner.args.no_tune),
        "hyperparameters": {n: {sel: runner.params(n, sel) for sel in ("plateau", "fixed")}
                            for n in names},
        "notes": notes,
    }
    if setting == "zeroshot":
        from .zeroshot import summary

        extra["zeroshot"] = summary(runs, split_info)
        notes.append("zeroshot: learning rates are the ones chosen in the standard setting (the "
                     "same model without the align loss)")
    if runner.data.name in ("av-mnist", "av-digits"):
        notes.append(f"{runner.data.name} pairs audio and image by class only (AV-MNIST style): "
                     "nothing co-occurs across modalities beyond the label")
    doc = summarize(runner.data.name, runner.data.modalities, setting, runs, seeds,
                    runner.cfg.as_dict(), split_info, runner.described, tuning, extra)
    out.mkdir(parents=True, exist_ok=True)
    written = [Path(p) for p in plot(doc, out)]  # plot() returns them under out
    doc["plots"] = [p.name for p in written]
    dump_json(doc, out / "results.json")
    written.insert(0, out / "results.json")
    print(format_table(doc), flush=True)
    return doc, written


def run_search(data, chosen: dict[str, dict], cfg, tune_seeds: list[int], max_train: int | None,
               disable: bool, pool: Pool) -> dict[str, Any]:
    """The pre-registered search on one data set: every :data:`registry.SEARCH` variant at
    ``bogc``'s chosen learning rate, validation only (same seeds as the tuning)."""
    from .methods import registry
    from .settings import make_split

    split = make_split(data, "standard", max_train=max_train)
    lr = chosen["bogc"]["plateau"]["lr"]
    variants = [n for n in registry.SEARCH if n != "bogc"]
    records: dict[str, Any] = {}
    tasks = [(n, search_task, (split, n, cfg, lr, tune_seeds)) for n in variants]
    with _progress(len(variants), f"search {data.name}", disable) as bar:
        for n, record in pool.run(tasks):
            records[n] = record
            bar.update(1)
    return {"lr": lr, "variants": {n: records[n] for n in variants}}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bogc bench``; returns the exit status (2 on a user error)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except BOGCError as exc:
        print(f"bogc bench: error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    check_args(args)
    # Without PyTorch this raises ModuleNotFoundError, which `bogc` turns into
    # one line naming the extras to install.
    import torch

    from ..data import load_dataset
    from .methods import registry
    from .protocol import TrainConfig
    from .report import cost_plot, dump_json, write_summary

    out = Path(args.out)
    torch.set_num_threads(args.threads)
    quick = args.quick
    names = registry.expand(args.methods) if args.methods or not quick else list(registry.QUICK_METHODS)
    for must in ("sum", "bogc"):
        if must not in names:
            names.insert(0 if must == "sum" else 1, must)
    seeds = list(range(args.seeds if args.seeds is not None else (2 if quick else 10)))
    fixed_epochs = args.epochs if args.epochs is not None else (2 if quick else 10)
    max_epochs = args.max_epochs if args.max_epochs is not None else max(fixed_epochs, 3 if quick else 40)
    if max_epochs < fixed_epochs:
        raise ConfigError(f"--epochs: the fixed budget {fixed_epochs} exceeds --max-epochs "
                          f"{max_epochs}; raise --max-epochs")
    tune_seeds = [100 + i for i in range(args.tune_seeds or (1 if quick else 3))]
    workers = args.jobs or min(_cores(), 8)
    max_train = 512 if quick else None
    cfg = TrainConfig(max_epochs=max_epochs, patience=args.patience, fixed_epochs=fixed_epochs,
                      batch_size=args.batch_size, model=args.model)
    datasets = args.dataset.split(",") if args.all else [args.dataset]
    # refuse a bad name, and any file that could not be written, before any training
    loaded = [load_dataset(ds, argument="--dataset") for ds in datasets]
    check_writable(out, planned_outputs(args, out, [d.name for d in loaded]), args.overwrite)
    jobs = [ALL_JOBS[j][0] for j in args.settings.split(",")] if args.all else [args.setting]
    if "zeroshot" in jobs:  # refuse too few classes or modalities before any training
        from .settings import make_split

        for data in loaded:
            make_split(data, "zeroshot")
    t0 = time.perf_counter()
    written: list[Path] = []
    search: dict[str, Any] = {}
    with Pool(workers, args.threads) as pool:
        for data in loaded:
            chosen: dict[str, dict] = {}
            tuning: dict[str, Any] = {}
            if args.reuse_tuning:
                tuning = reused_tuning(Path(args.reuse_tuning), data.name, names)
            elif not args.no_tune:
                tuning = tune_methods(data, names, cfg, tune_seeds, max_train, args.no_progress,
                                      pool)
            chosen = {n: r["chosen"] for n, r in tuning.items()}
            if args.search:
                search[data.name] = run_search(data, chosen, cfg, tune_seeds, max_train,
                                               args.no_progress, pool)
                search[data.name]["bogc"] = tuning["bogc"]
                path = out / data.name / "search.json" if args.all else out / "search.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                dump_json(dict(search[data.name], dataset=data.name, train_config=cfg.as_dict()), path)
                written.append(path)
            runner = Runner(data, cfg, chosen, max_train, args)
            if not args.all:
                _, w = run_one(runner, args.setting, names, seeds, tuning, out, args.shots,
                                 pool)
                written += w
                continue
            base = out / data.name
            for folder in args.settings.split(","):
                setting, k = ALL_JOBS[folder]
                shots = args.shots if k is None else k
                doc, w = run_one(runner, setting, names, seeds, tuning, base / folder, shots,
                                 pool)
                written += w
                if setting == "standard":
                    written.append(cost_plot([doc], base / "cost_accuracy.png"))
    if args.all:
        results = [p for p in written if p.name == "results.json"]
        written.append(write_summary(out, results))
    for p in written:
        print(f"wrote {p}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
