"""Training-step cost of GradientCalibrator against a plain summed-loss step and TorchJD.

Model: a shared MLP trunk (256 -> 512 -> 512 -> 256, about 5.3e5 parameters)
with three task heads (three losses, one per head), batch 64 and 512.
For each batch size and method, one step is ``zero_grad`` + forward +
(calibrated) backward; the optimiser step is the same for every method and
left out.

Methods: ``plain`` (``sum(l.mean()).backward()``), BOGC with each sample source
(``per_example`` and ``microbatch`` with and without the Linear shortcut,
``steps``, ``laplace``) and, when ``torchjd`` is installed, TorchJD's ``Mean``
aggregator via ``mtl_backward`` + ``jac_to_grad``. Times are medians over
interleaved rounds (every method once per round, so machine load affects all
alike), reported as ratios to ``plain`` measured in the same run.

Peak memory: each (method, batch) runs in a fresh subprocess; the increase of
the process's peak resident set size over one step, minus the same for
``plain``, is the *extra* memory, compared with the target ``(2S + 2) x``
parameter bytes (S = 3 sources).

Usage::

    python benchmarks/step.py                  # full run, writes benchmarks/results/step.json
    python benchmarks/step.py --quick          # fewer rounds, batch 64 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from bogc_core.integrations.torch import GradientCalibrator
from torch import nn

S = 3
IN, WIDTHS, CLASSES = 256, (512, 512, 256), 10


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        dims = (IN,) + WIDTHS
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.heads = nn.ModuleList(nn.Linear(WIDTHS[-1], CLASSES) for _ in range(S))

    def features(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x

    def forward(self, x):
        f = self.features(x)
        return f, [h(f) for h in self.heads]


def setup(batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = Trunk()
    x = torch.randn(batch, IN)
    ys = [torch.randint(0, CLASSES, (batch,)) for _ in range(S)]
    return model, x, ys


def make_step(method: str, model: Trunk, x, ys):
    ce = nn.CrossEntropyLoss(reduction="none")
    names = [f"task{k}" for k in range(S)]

    def losses():
        _, outs = model(x)
        return {n: ce(o, y) for n, o, y in zip(names, outs, ys)}

    if method == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            sum(l.mean() for l in losses().values()).backward()
        return step
    if method == "torchjd_mean":
        from torchjd.aggregation import Mean
        from torchjd.autojac import jac_to_grad, mtl_backward

        shared = list(model.layers.parameters())
        agg = Mean()

        def step():
            model.zero_grad(set_to_none=True)
            f, outs = model(x)
            mtl_backward([ce(o, y).mean() for o, y in zip(outs, ys)], features=f,
                         shared_params=shared)
            jac_to_grad(shared, agg)
        return step
    samples, _, variant = method.removeprefix("bogc_").partition(":")
    kw = {}
    if variant == "shortcut":
        kw["model"] = model
    if samples == "laplace":
        kw["laplace_layers"] = dict(zip(names, model.heads))
    cal = GradientCalibrator(model.named_parameters(), samples=samples, chunks=4, **kw)

    def step():
        model.zero_grad(set_to_none=True)
        cal.backward(losses())
    return step


def methods_for(batch: int, have_torchjd: bool) -> list[str]:
    m = ["plain", "bogc_per_example:shortcut", "bogc_microbatch:shortcut", "bogc_microbatch",
         "bogc_steps", "bogc_laplace"]
    if batch <= 64:
        m.append("bogc_per_example")  # exact per-example rows: too slow for batch 512 here
    if have_torchjd:
        m.append("torchjd_mean")
    return m


def time_methods(batch: int, methods: list[str], rounds: int) -> dict[str, float]:
    model, x, ys = setup(batch)
    steps = {m: make_step(m, model, x, ys) for m in methods}
    for st in steps.values():  # warm-up
        st()
        st()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m, st in steps.items():
            t0 = time.perf_counter()
            st()
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss_child(method: str, batch: int) -> None:
    """In a subprocess: peak resident memory during 3 steps minus the resident memory before.

    The child runs with a fixed glibc mmap threshold (128 KiB), so freed
    tensors go back to the system and do not hide later peaks. A thread samples ``/proc/self/statm`` every 0.2 ms (torch ops release the
    GIL); large tensors are mmapped by the allocator, so the resident size
    follows allocations and frees closely.
    """
    import threading

    model, x, ys = setup(batch)
    with torch.no_grad():
        model(x)
    step = make_step(method, model, x, ys)
    for _ in range(2):  # load lazily imported code and fill caches before the baseline
        step()
    model.zero_grad(set_to_none=True)
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for _ in range(3):
        step()
    done.set()
    th.join()
    print(json.dumps({"peak_increase_bytes": max(peak[0], _rss()) - base}))


def peak_rss(method: str, batch: int, threads: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", method, "--batch", str(batch), "--threads", str(threads)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    ).stdout.strip().splitlines()[-1]
    return int(json.loads(out)["peak_increase_bytes"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step.json"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._child:
        peak_rss_child(args._child, args.batch)
        return 0
    if args.quick:
        args.batches, args.rounds = [64], 4
    try:
        import torchjd  # noqa: F401

        have_torchjd = True
    except ImportError:
        have_torchjd = False
    model, _, _ = setup(8)
    n_params = sum(p.numel() for p in model.parameters())
    n_trunk = sum(p.numel() for p in model.layers.parameters())
    target = (2 * S + 2) * n_params * 4
    result = {
        "benchmark": "step",
        "torch": torch.__version__,
        "torchjd_installed": have_torchjd,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {args.threads}",
        "sources": S,
        "params": n_params,
        "trunk_params": n_trunk,
        "memory_target_extra_bytes": target,
        "rounds": args.rounds,
        "batches": {},
    }
    for batch in args.batches:
        methods = methods_for(batch, have_torchjd)
        t = time_methods(batch, methods, args.rounds)
        rows = {}
        for m in methods:
            rows[m] = {"time_s": t[m], "ratio_to_plain": t[m] / t["plain"]}
            if "torchjd_mean" in t:
                rows[m]["ratio_to_torchjd_mean"] = t[m] / t["torchjd_mean"]
        if not args.no_memory:
            peaks = {m: peak_rss(m, batch, args.threads) for m in methods}
            for m in methods:
                extra = peaks[m] - peaks["plain"]
                rows[m]["peak_rss_increase_bytes"] = peaks[m]
                rows[m]["extra_memory_bytes"] = extra
                rows[m]["extra_memory_in_params"] = extra / (4 * n_params)
                rows[m]["memory_within_target"] = extra <= target
        result["batches"][str(batch)] = rows
        print(f"\nbatch {batch}  (params {n_params}, memory target {(2 * S + 2)}x params = {target / 2**20:.1f} MiB)")
        print(f"{'method':30s} {'ms':>9s} {'x plain':>8s} {'x TorchJD':>9s} {'extra MiB':>10s} {'x params':>8s}")
        for m, r in rows.items():
            print(f"{m:30s} {1e3 * r['time_s']:9.2f} {r['ratio_to_plain']:8.2f} "
                  f"{r.get('ratio_to_torchjd_mean', float('nan')):9.2f} "
                  f"{r.get('extra_memory_bytes', float('nan')) / 2**20:10.1f} "
                  f"{r.get('extra_memory_in_params', float('nan')):8.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
