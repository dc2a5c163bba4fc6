"""One training step of each ``bogc bench`` method on the bench models, as a ratio to the sum.

The models are the harness's own (``integrations/bench/models.py``): ``mlp``
(late fusion) and ``transformer`` (every trunk parameter shared by every
source), built for av-mnist's widths (audio 384, image 196, 10 classes),
batch 128, one thread. A step is the forward, the per-example losses, the
method's ``backward`` (BOGC: micro-batch samples, the harness default) and
the SGD step, as ``protocol.train_run`` runs it; evaluation is left out.
Methods are interleaved over ``--rounds`` rounds (each timing ``--steps``
steps), so machine load affects all alike; a method's time is its median over
rounds and its ratio is to ``sum`` of the same run.

Usage::

    python benchmarks/bench_step.py            # writes benchmarks/results/bench_step.json
    python benchmarks/bench_step.py --methods sum,bogc --rounds 3
    python benchmarks/bench_step.py --methods sum,bogc,bogc:per_example   # another sample source
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from bogc_core.integrations.bench.methods.registry import configured
from bogc_core.integrations.bench.models import build_model
from bogc_core.integrations.bench.protocol import source_losses

DIMS = {"audio": 384, "image": 196}
CLASSES, BATCH = 10, 128


def make_step(model_name: str, method: str):
    """One step of ``method`` (``bogc:per_example``: BOGC with another sample source)."""
    torch.manual_seed(0)
    model = build_model(model_name, DIMS, CLASSES, 64, 32)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(BATCH, d, generator=g) for d in DIMS.values()]
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    name, _, samples = method.partition(":")
    m = configured(name, {name: {"lr": 0.01}})
    if samples:
        m.samples = samples
    m.steps_per_epoch = 10**9  # BOGC's diagnostics only on the first step, as in most steps
    m.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        z, zs = model(xs)
        losses = source_losses(model, z, zs, y)
        opt.zero_grad(set_to_none=True)
        m.backward(losses, (z, zs), y)
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,transformer")
    ap.add_argument("--methods", default="sum,bogc,bogc:per_example,pcgrad,mgda,mmpareto")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "bench_step.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = ["sum"] + [m for m in args.methods.split(",") if m and m != "sum"]
    doc: dict = {"benchmark": "bench_step", "torch": torch.__version__, "batch": BATCH,
                 "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads 1",
                 "rounds": args.rounds, "steps": args.steps, "models": {}}
    for model_name in args.models.split(","):
        steps = {m: make_step(model_name, m) for m in methods}
        for f in steps.values():  # warm-up (numba compilation, allocator)
            for _ in range(3):
                f()
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for m, f in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    f()
                times[m].append((time.perf_counter() - t0) / args.steps)
        med = {m: statistics.median(v) for m, v in times.items()}
        doc["models"][model_name] = {m: {"step_ms": 1e3 * med[m], "ratio_to_sum": med[m] / med["sum"]}
                                     for m in methods}
        print(f"{model_name}, batch {BATCH}")
        for m in methods:
            print(f"  {m:17s} {1e3 * med[m]:8.2f} ms  {med[m] / med['sum']:5.2f}x sum")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
