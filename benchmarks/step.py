"""Training-step cost of GradientCalibrator against a plain step, TorchJD Mean and MMPareto.

Models:

- ``trunk``: a shared MLP trunk (256 -> 512 -> 512 -> 256, ReLU) with three
  task heads (10 classes), three cross-entropy losses, one per head;
- ``multimodal``: two encoders (384 -> 512 -> 256 and 196 -> 512 -> 256,
  ReLU), a fusion head on their concatenation and one unimodal head each;
  losses ``fusion``, ``audio`` and ``image`` (a unimodal loss reaches only
  its own encoder and head).

For each model, batch size and method, one step is ``zero_grad`` + forward +
(calibrated) backward; the optimiser step is the same for every method and
left out.

Methods: ``plain`` (``sum(l.mean()).backward()``); BOGC
``samples="per_example"`` with the per-layer shortcut (and, with
``--all-sources``, the other sample sources); ``torchjd_mean`` (trunk model,
when ``torchjd`` is installed: ``mtl_backward`` + ``jac_to_grad(Mean())``);
``mmpareto`` (multimodal model: every loss's gradient from one batched
backward, then the MMPareto rule per encoder). Times are medians over
interleaved rounds (every method once per round, so machine load affects all
alike), reported as ratios to ``plain`` (and TorchJD) measured in the same run.

Stage split (``--stages``): the BOGC per-example step timed by stage
(statistics, calibration, writing ``p.grad``, the rest) in the same run.

Peak memory: each (model, method, batch) runs in a fresh subprocess; the
increase of the process's peak resident set size over the steps, minus the
same for ``plain``, is the *extra* memory, compared with the target
``(2S + 2) x`` parameter bytes (S = 3 sources).

Usage::

    python benchmarks/step.py                  # full run, writes benchmarks/results/step.json
    python benchmarks/step.py --quick          # fewer rounds, batch 64 only, no memory
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
from collections.abc import Callable
from typing import Any

import torch
from bogc_core.integrations.torch import Diagnostics, GradientCalibrator, Laplace, Microbatch
from torch import nn

S = 3
IN, WIDTHS, CLASSES = 256, (512, 512, 256), 10
AUDIO_IN, IMAGE_IN, HIDDEN, EMBED = 384, 196, 512, 256


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


class MultiModal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(AUDIO_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, EMBED), nn.ReLU())
        self.image = nn.Sequential(nn.Linear(IMAGE_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, EMBED), nn.ReLU())
        self.fusion = nn.Linear(2 * EMBED, CLASSES)
        self.audio_head = nn.Linear(EMBED, CLASSES)
        self.image_head = nn.Linear(EMBED, CLASSES)

    def forward(self, xa, xi):
        za, zi = self.audio(xa), self.image(xi)
        return self.fusion(torch.cat([za, zi], dim=1)), self.audio_head(za), self.image_head(zi)


def setup(model_name: str, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    if model_name == "trunk":
        model: nn.Module = Trunk()
        inputs: tuple = (torch.randn(batch, IN),)
        ys = [torch.randint(0, CLASSES, (batch,)) for _ in range(S)]
    else:
        model = MultiModal()
        inputs = (torch.randn(batch, AUDIO_IN), torch.randn(batch, IMAGE_IN))
        y = torch.randint(0, CLASSES, (batch,))
        ys = [y] * S
    return model, inputs, ys


def source_names(model_name: str) -> list[str]:
    return [f"task{k}" for k in range(S)] if model_name == "trunk" else ["fusion", "audio", "image"]


def make_step(method: str, model_name: str, model: nn.Module, inputs: tuple, ys) -> Callable[[], None]:
    ce = nn.CrossEntropyLoss(reduction="none")
    names = source_names(model_name)

    def outputs():
        out = model(*inputs)
        return out[1] if model_name == "trunk" else list(out)

    def losses():
        return {n: ce(o, y) for n, o, y in zip(names, outputs(), ys)}

    if method == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            sum(l.mean() for l in losses().values()).backward()
        return step
    if method == "torchjd_mean":
        from torchjd.aggregation import Mean
        from torchjd.autojac import jac_to_grad, mtl_backward

        assert isinstance(model, Trunk)
        shared = list(model.layers.parameters())
        agg = Mean()

        def step():
            model.zero_grad(set_to_none=True)
            f, outs = model(*inputs)
            mtl_backward([ce(o, y).mean() for o, y in zip(outs, ys)], features=f,
                         shared_params=shared)
            jac_to_grad(shared, agg)
        return step
    if method == "mmpareto":
        from bogc_core.integrations.bench.methods.mmpareto import mmpareto

        assert isinstance(model, MultiModal)
        params = list(model.parameters())
        enc = {"audio": list(model.audio.parameters()), "image": list(model.image.parameters())}
        pos = {id(p): j for j, p in enumerate(params)}

        def step():
            model.zero_grad(set_to_none=True)
            ls = [l.mean() for l in losses().values()]
            # Every loss's gradient on every parameter, in one batched backward.
            grads = torch.autograd.grad(torch.stack(ls), params, grad_outputs=torch.eye(S),
                                        is_grads_batched=True, allow_unused=True,
                                        materialize_grads=True)
            total = [g.sum(0) for g in grads]
            for k, e in ((1, "audio"), (2, "image")):
                g_m = [grads[pos[id(p)]][0] for p in enc[e]]
                g_u = [grads[pos[id(p)]][k] for p in enc[e]]
                new, _ = mmpareto(g_m, g_u)
                for p, t in zip(enc[e], new):
                    total[pos[id(p)]] = t
            for p, t in zip(params, total):
                p.grad = t
        return step
    samples, _, variant = method.removeprefix("bogc_").partition(":")
    kw: dict = {"diagnostics": Diagnostics(every=1000)}
    if variant == "shortcut":
        kw["model"] = model
    if samples == "laplace":
        heads = model.heads if isinstance(model, Trunk) else [model.fusion, model.audio_head, model.image_head]
        source: Any = Laplace(layers=dict(zip(names, heads)))
    else:
        source = Microbatch(chunks=4) if samples == "microbatch" else samples
    cal = GradientCalibrator(model.named_parameters(), samples=source, **kw)

    def step():
        model.zero_grad(set_to_none=True)
        cal.backward(losses())
    step.calibrator = cal  # type: ignore[attr-defined]
    return step


def methods_for(model_name: str, batch: int, have_torchjd: bool, all_sources: bool) -> list[str]:
    m = ["plain", "bogc_per_example:shortcut"]
    if all_sources:
        m += ["bogc_microbatch:shortcut", "bogc_microbatch", "bogc_steps", "bogc_laplace"]
        if batch <= 64:
            m.append("bogc_per_example")  # exact per-example rows: too slow for large batches
    if model_name == "trunk" and have_torchjd:
        m.append("torchjd_mean")
    if model_name == "multimodal":
        m.append("mmpareto")
    return m


def time_methods(model_name: str, batch: int, methods: list[str], rounds: int) -> dict[str, float]:
    model, inputs, ys = setup(model_name, batch)
    steps = {m: make_step(m, model_name, model, inputs, ys) for m in methods}
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


def stage_split(model_name: str, batch: int, rounds: int) -> dict[str, float]:
    """Median seconds per stage of the BOGC per-example step (shortcut): statistics (the
    sample source), fill (flat buffers and the finiteness check), calibration (the fused
    calls), write (``p.grad``), and the rest (forward, loss checks, graph walk)."""
    from bogc_core.integrations.torch import workspace

    model, inputs, ys = setup(model_name, batch)
    step = make_step("bogc_per_example:shortcut", model_name, model, inputs, ys)
    cal = step.calibrator  # type: ignore[attr-defined]
    spent: dict[str, float] = {}

    def timed(stage: str, fn: Callable) -> Callable:
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - t0
        return wrapper

    cal._sample = timed("statistics", cal._sample)
    cal._write = timed("write", cal._write)
    orig = {n: getattr(workspace.Group, n) for n in ("fill", "calibrate", "plain", "finite_sum")}
    workspace.Group.fill = timed("fill", orig["fill"])
    workspace.Group.finite_sum = timed("fill", orig["finite_sum"])
    workspace.Group.calibrate = timed("calibration", orig["calibrate"])
    workspace.Group.plain = timed("calibration", orig["plain"])
    try:
        step()
        step()
        rows: dict[str, list[float]] = {}
        for _ in range(rounds):
            spent.clear()
            t0 = time.perf_counter()
            step()
            total = time.perf_counter() - t0
            spent["rest"] = total - sum(spent.values())
            spent["total"] = total
            for k, v in spent.items():
                rows.setdefault(k, []).append(v)
    finally:
        for n, f in orig.items():
            setattr(workspace.Group, n, f)
    return {k: statistics.median(v) for k, v in rows.items()}


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss_child(model_name: str, method: str, batch: int) -> None:
    """In a subprocess: peak resident memory during 3 steps minus the resident memory before.

    The child runs with a fixed glibc mmap threshold (128 KiB), so freed
    tensors go back to the system and do not hide later peaks. A thread
    samples ``/proc/self/statm`` every 0.2 ms (torch ops release the GIL);
    large tensors are mmapped by the allocator, so the resident size follows
    allocations and frees closely. The baseline is taken with the gradients
    dropped, so a method's persistent buffers (the calibrator's workspace)
    count as extra memory.
    """
    import threading

    model, inputs, ys = setup(model_name, batch)
    with torch.no_grad():
        model(*inputs)
    step = make_step(method, model_name, model, inputs, ys)
    # Load lazily imported code and fill caches, then drop everything a step keeps.
    for _ in range(2):
        step()
    model.zero_grad(set_to_none=True)
    cal = getattr(step, "calibrator", None)
    if cal is not None:
        cal._workspace.release()
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


def peak_rss(model_name: str, method: str, batch: int, threads: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", method, "--_model", model_name, "--batch", str(batch),
         "--threads", str(threads)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    ).stdout.strip().splitlines()[-1]
    return int(json.loads(out)["peak_increase_bytes"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["trunk", "multimodal"], choices=["trunk", "multimodal"])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--memory-batches", type=int, nargs="+", default=[64, 256, 512, 1024])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    ap.add_argument("--all-sources", action="store_true", help="also time the other BOGC sample sources")
    ap.add_argument("--stages", action="store_true", help="time the BOGC per-example step by stage")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step.json"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_model", default="trunk", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._child:
        peak_rss_child(args._model, args._child, args.batch)
        return 0
    if args.quick:
        args.batches, args.rounds, args.no_memory = [64], 4, True
    try:
        import torchjd  # noqa: F401

        have_torchjd = True
    except ImportError:
        have_torchjd = False
    result: dict = {
        "benchmark": "step",
        "torch": torch.__version__,
        "torchjd_installed": have_torchjd,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {args.threads}",
        "sources": S,
        "rounds": args.rounds,
        "models": {},
    }
    for model_name in args.models:
        model, _, _ = setup(model_name, 8)
        n_params = sum(p.numel() for p in model.parameters())
        target = (2 * S + 2) * n_params * 4
        entry: dict = {"params": n_params, "memory_target_extra_bytes": target, "batches": {}}
        result["models"][model_name] = entry
        batches = sorted(set(args.batches) | (set() if args.no_memory else set(args.memory_batches)))
        for batch in batches:
            methods = methods_for(model_name, batch, have_torchjd, args.all_sources)
            rows: dict = {m: {} for m in methods}
            if batch in args.batches:
                t = time_methods(model_name, batch, methods, args.rounds)
                for m in methods:
                    rows[m] = {"time_s": t[m], "ratio_to_plain": t[m] / t["plain"]}
                    for base in ("torchjd_mean", "mmpareto"):
                        if base in t:
                            rows[m][f"ratio_to_{base}"] = t[m] / t[base]
            if not args.no_memory and batch in args.memory_batches:
                peaks = {m: peak_rss(model_name, m, batch, args.threads) for m in methods}
                for m in methods:
                    extra = peaks[m] - peaks["plain"]
                    rows[m]["peak_rss_increase_bytes"] = peaks[m]
                    rows[m]["extra_memory_bytes"] = extra
                    rows[m]["extra_memory_in_params"] = extra / (4 * n_params)
                    rows[m]["memory_within_target"] = extra <= target
            if args.stages and batch in args.batches:
                entry.setdefault("stages_s", {})[str(batch)] = stage_split(model_name, batch, args.rounds)
            entry["batches"][str(batch)] = rows
            print(f"\n{model_name}, batch {batch}  (params {n_params}, memory target "
                  f"{(2 * S + 2)}x params = {target / 2**20:.1f} MiB)")
            print(f"{'method':30s} {'ms':>9s} {'x plain':>8s} {'x TorchJD':>9s} {'x MMPareto':>10s} "
                  f"{'extra MiB':>10s} {'x params':>8s}")
            nan = float("nan")
            for m, r in rows.items():
                print(f"{m:30s} {1e3 * r.get('time_s', nan):9.2f} {r.get('ratio_to_plain', nan):8.2f} "
                      f"{r.get('ratio_to_torchjd_mean', nan):9.2f} {r.get('ratio_to_mmpareto', nan):10.2f} "
                      f"{r.get('extra_memory_bytes', nan) / 2**20:10.1f} "
                      f"{r.get('extra_memory_in_params', nan):8.2f}")
            if args.stages and batch in args.batches:
                st = entry["stages_s"][str(batch)]
                print("stages (ms): " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in st.items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
